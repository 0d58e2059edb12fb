"""One model over several processes (machines) with MLX's distributed backend, launched by ``mlx.launch``."""
