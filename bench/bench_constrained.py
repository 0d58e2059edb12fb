#!/usr/bin/env python3
"""What a grammar costs: decode tokens/s with and without one, on the same engine, in one run.

    make bench-constrained   (or: .venv/bin/python bench/bench_constrained.py [--trials N] [--model PATH])

The server's own GenerationEngine (caches off) decodes the same prompt freely
and under a grammar, alternating trials so that machine noise hits both
alike; medians are compared.  Two grammars: a JSON schema whose one string
field must be long (the mask is computed for many tokens inside a string),
and a forced call of one of four tools with typed arguments.  Decode speed
is measured after the first token, over at least 40 tokens.
The target: constrained decode >= 0.8x free decode.  Exits 1 if missed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]

from mlx_server.blas import preload_optimized_blas  # noqa: E402 - before MLX is imported

BLAS = preload_optimized_blas()

from mlx_server.chat.call_formats import grammar_writer  # noqa: E402
from mlx_server.chat.grammars import OutputConstraint, build_grammar  # noqa: E402
from mlx_server.chat.prompts import ChatTemplate  # noqa: E402
from mlx_server.engine.generation import EngineOptions, GenerationEngine  # noqa: E402
from mlx_server.engine.prompt_cache import KVPromptCache  # noqa: E402
from mlx_server.model.loading import load_model  # noqa: E402
from mlx_server.vocabulary import GenerationStats, Message, Tool  # noqa: E402
from testbed.requests import ask  # noqa: E402

TARGET = 0.8
MAX_TOKENS = 96
STORY_SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "story": {"type": "string", "minLength": 300}},
    "required": ["title", "story"],
}


def _tool(name: str, properties: dict[str, object]) -> Tool:
    return Tool(name, parameters={"type": "object", "properties": properties, "required": list(properties)})


TOOLS = [
    _tool("read_file", {"path": {"type": "string"}, "offset": {"type": "integer", "minimum": 0}}),
    _tool("write_file", {"path": {"type": "string"}, "content": {"type": "string", "minLength": 200}}),
    _tool("run_command", {"command": {"type": "string"}, "timeout_s": {"type": "number"}}),
    _tool("search", {"query": {"type": "string"}, "regex": {"type": "boolean"}}),
]


def _decode_speed(engine: GenerationEngine, prompt: list[int], grammar: str | None, seed: int) -> GenerationStats:
    request = ask(MAX_TOKENS, grammar, temperature=0.7, seed=seed).request(prompt, use_cache=False)
    return asyncio.run(engine.complete(request))[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()

    loaded = load_model(args.model)
    engine = GenerationEngine(
        loaded,
        KVPromptCache.for_model(loaded.model, loaded.identity, max_entries=0, max_bytes=0),
        EngineOptions(max_batch=1, prefill_batch=1, kv_budget_bytes=2**31),
    )
    engine.warm_up()
    writer = grammar_writer(loaded.tokenizer)
    template = ChatTemplate(loaded.tokenizer)
    story = [Message("user", "Write a long story about a lighthouse keeper, as JSON.")]
    act = [Message("user", "Save a long README for my project in README.md.")]
    cases = {
        "JSON schema (long string)": (
            template.tokens(story),
            build_grammar(OutputConstraint(json_schema=STORY_SCHEMA), writer),
        ),
        "forced tool call (4 tools)": (
            template.tokens(act, TOOLS),
            build_grammar(OutputConstraint(tools=TOOLS, tool_mode="required", parallel_calls=False), writer),
        ),
    }
    print(f"Model {loaded.name} on {loaded.device}, BLAS {BLAS.name}; {args.trials} trials each, alternating")
    print(f"{'case':<28} {'free tok/s':>11} {'grammar tok/s':>14} {'ratio':>7}  tokens (free/grammar)")
    failed = False
    for name, (prompt, grammar) in cases.items():
        free: list[GenerationStats] = []
        constrained: list[GenerationStats] = []
        for trial in range(args.trials):
            free.append(_decode_speed(engine, prompt, None, seed=trial))
            constrained.append(_decode_speed(engine, prompt, grammar, seed=trial))
        short = [stats for stats in free + constrained if stats.completion_tokens < 40]
        if short:
            print(f"  note: {len(short)} trials decoded fewer than 40 tokens")
        free_speed = statistics.median(stats.tokens_per_second for stats in free)
        grammar_speed = statistics.median(stats.tokens_per_second for stats in constrained)
        ratio = grammar_speed / free_speed
        failed |= ratio < TARGET
        tokens = f"{statistics.median(s.completion_tokens for s in free):.0f}/"
        tokens += f"{statistics.median(s.completion_tokens for s in constrained):.0f}"
        print(f"{name:<28} {free_speed:>11.1f} {grammar_speed:>14.1f} {ratio:>6.2f}x  {tokens}")
    print(f"target: grammar decode >= {TARGET}x free decode -> {'MISSED' if failed else 'OK'}")
    engine.shutdown()
    sys.stdout.flush()
    os._exit(1 if failed else 0)  # skip interpreter teardown: MLX's and llguidance's native threads can abort it


if __name__ == "__main__":
    main()
