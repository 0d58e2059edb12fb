"""An OpenAI- and Anthropic-compatible MLX inference server (the package behind scripts/mlx-server.py).

Data flows one way: HTTP request -> a dialect's validated schema
(``dialects/*_protocol``) -> the core's ``ChatRequest`` (``chat.request``) ->
prompt tokens (``prompts``, ``tool_prompts``) -> generation (``generation``,
with ``prompt_cache`` and ``grammar``) -> neutral events (``chat.service``,
``chat.output``, ``tool_parsing``) -> the dialect's JSON or SSE
(``dialects/*``).  ``app`` assembles the routers and middleware;
``model_loading`` and ``gguf`` turn a model reference into a model and
tokenizer; ``blas`` must run before anything imports MLX.

Nothing here imports MLX at package import time, so ``blas`` can still act.
"""

__all__: list[str] = []
