"""An OpenAI- and Anthropic-compatible MLX inference server (the package behind scripts/mlx-server.py).

Data flows one way: HTTP request -> a dialect's validated schema
(``dialects/*_protocol``) -> the core's ``ChatRequest`` (``chat.request``) ->
prompt tokens (``prompts``, ``tool_prompts``) -> a ``jobs.Job`` for the
engine (``generation``: one worker thread decoding a batch through
``batch_decoding``, or ``sequential_decoding`` with a quantized KV cache, with
``prompt_cache``, ``kv_budget``, ``sampling`` and ``grammar``) -> neutral
events (``chat.service``, ``chat.output``, ``tool_parsing``) -> the dialect's
JSON or SSE (``dialects/*``).  ``app`` assembles the routers and middleware
(``guards``, ``errors``); ``model_loading``, ``gguf`` and ``weight_format``
turn a model reference into a model and tokenizer; ``blas`` must run before
anything imports MLX.

Nothing here imports MLX at package import time, so ``blas`` can still act.
"""

__all__: list[str] = []
