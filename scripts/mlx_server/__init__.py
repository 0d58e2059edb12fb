"""An OpenAI-compatible MLX inference server (the package behind scripts/mlx-server.py).

Data flows one way: HTTP request -> validated schema (``schemas``) -> prompt
tokens (``prompts``) -> generation (``generation``) -> response or SSE stream
(``app``, ``streaming``).  ``model_loading`` and ``gguf`` turn a model reference
into a model and tokenizer; ``blas`` must run before anything imports MLX.

Nothing here imports MLX at package import time, so ``blas`` can still act.
"""

__all__: list[str] = []
