"""flowerbed app: FedTA (federated continual learning with tail anchors), CVPR 2025."""
