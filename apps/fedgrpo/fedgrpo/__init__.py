"""FedGRPO app (Zhu et al., AAAI 2026): reward-only federated optimisation of a language model."""
