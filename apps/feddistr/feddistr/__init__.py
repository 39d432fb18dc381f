"""FedDistr: one-shot federated learning by disentangling distributions (reconstruction)."""
