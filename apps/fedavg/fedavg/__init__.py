"""flowerbed reference app: FedAvg / FedProx on Fashion-MNIST."""
