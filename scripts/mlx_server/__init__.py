"""An Anthropic- and OpenAI-compatible MLX inference server (the package behind scripts/mlx-server.py).

Layers, each importing only those below it (``tests/server/test_layers.py`` keeps it so):

* ``edge/``: the HTTP application (``app``), guards (keys, body and queue
  limits), metrics, and domain errors rendered in each dialect's shape;
* ``dialects/``: one router and protocol per API (Anthropic messages, OpenAI
  chat, responses and completions) translating to and from the chat core;
* ``chat/``: ``ChatService`` owns a request from messages to events, with each
  model's ``profile`` (its template, call format, special tokens, sampling),
  prompts, grammars, tool-call parsing and cache-miss diagnostics;
* ``engine/``: one worker thread per model decoding a continuous batch
  (``generation``, ``batch_decoding``, ``speculation``), the prompt cache
  (``prompt_cache``, ``cache_entries``, ``cache_lanes``), the KV budget,
  samplers and grammar masks;
* ``model/``: a model reference (GGUF, MLX directory, repo id: cached, or downloaded by ``model/hub.py``) into a
  loaded model, its weight format and its recommended sampling;
* ``vocabulary``: the words every layer shares (messages, sampling, engine
  events, statistics, domain errors), importing nothing of ours.

Beside them: ``settings`` (every option once), ``startup`` (load, build,
serve), ``mlx_lm_compat`` (the only place that names mlx-lm's private parts),
``stop_text``, ``machine``, ``agent_environment``, and ``blas``, which must
run before anything imports MLX: nothing here imports MLX at package import.
"""

__all__: list[str] = []
