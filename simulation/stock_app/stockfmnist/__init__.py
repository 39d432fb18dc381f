"""stockfmnist: a Flower app written like Flower's quickstart-pytorch (the benchmark's stock mode)."""
