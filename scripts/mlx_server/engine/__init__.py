"""The engine: one worker thread owns the model and decodes every request in one continuous batch.

``generation`` is its entry point (admission, the KV budget, delivery of
events to each request's event loop); ``batch_decoding`` and
``sequential_decoding`` run the steps; ``sequence`` follows one request from
its cache lease to its last token; ``prompt_cache`` keeps KV state for reuse;
``constrained`` and ``sampling`` shape each token.  Nothing here knows a chat
template or an API dialect: requests arrive as token ids and a grammar string.
"""

__all__: list[str] = []
