"""The protocol-neutral chat core: a request from messages to events, whatever dialect it came in.

``service`` owns each request (``ChatService.start`` -> ``ChatRun``): prompts
through the chat template (``prompts``, ``tool_prompts``), the output rules
(``grammars``, ``tool_parsing``, ``output``), the engine's stream, and the
events a dialect encodes (``events``).  ``diagnostics`` explains cache misses;
``answer_cache`` replays exact answers to deterministic requests.  Nothing
here imports a web framework or the engine's implementation: the engine is
reached through ``vocabulary.Engine``.
"""

__all__: list[str] = []
