"""FedQual: quality-aware federated label-distribution learning (flowerbed app)."""
