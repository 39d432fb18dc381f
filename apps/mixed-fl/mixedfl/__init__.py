"""Mixed FL app (Augenstein et al., arXiv:2205.13655): a server-side loss next to the federated one."""
