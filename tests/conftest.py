"""Loaded first by pytest: the optimized BLAS must be chosen before anything imports MLX, as the server does."""

from mlx_server.blas import preload_optimized_blas

preload_optimized_blas()
