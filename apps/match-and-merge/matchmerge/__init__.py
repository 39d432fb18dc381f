"""Match-and-merge (GMMA / RMMA): federated heterogeneous LMs for N-best rescoring."""
