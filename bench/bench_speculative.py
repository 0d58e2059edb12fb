#!/usr/bin/env python3
"""Prompt-lookup speculative decoding against --speculative off, in one run, on the default model.

    make bench-speculative        (or: .venv/bin/python bench/bench_speculative.py)

Two in-process engines on the same weights, one per mode, greedy:

(a) copying: an Edit-style forced tool call whose ``old_string`` is a
    40-line block of a file that a Read result put in the prompt (under the
    call's grammar), and "repeat this file with one line changed";
(b) free prose that does not repeat its context;
(c) 8 concurrent clients mixing both (speculation runs only while one
    sequence decodes alone, so this measures that it costs nothing there).

Decode speed is tokens/s after the first token (one request at a time for
(a) and (b), median of ``--runs``); (c) is total tokens over wall time.
Targets: (a) at least 2.0x, (b) at least 0.97x, (c) at least 1.0x, and the
text identical to --speculative off in every case.  Exits 1 if one is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from serverlib import report_targets

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]

from mlx_server.blas import preload_optimized_blas  # noqa: E402

preload_optimized_blas()  # before MLX is imported, as the server does

from mlx_server.chat.call_formats import HERMES, grammar_writer  # noqa: E402
from mlx_server.chat.grammars import OutputConstraint, build_grammar  # noqa: E402
from mlx_server.engine.generation import EngineOptions, GenerationEngine  # noqa: E402
from mlx_server.engine.prompt_cache import KVPromptCache  # noqa: E402
from mlx_server.model.loading import load_model  # noqa: E402
from mlx_server.vocabulary import GenerationStats, SpeculativeMode, Tool  # noqa: E402
from testbed.requests import Ask, ask  # noqa: E402

FILE = "\n".join(
    f"def handler_{i}(request):\n    value = request.args.get('item_{i}', {i})\n    return respond(value * {i + 1})"
    for i in range(20)
)
BLOCK = "\n".join(FILE.splitlines()[12:52])  # 40 lines
CHANGED = FILE.replace("request.args.get('item_7', 7)", "request.args.get('item_7', 70)")
EDIT = Tool(
    "edit_file",
    parameters={
        "type": "object",
        "properties": {"path": {"enum": ["handlers.py"]}, "old_string": {"type": "string"}},
        "required": ["path", "old_string"],
    },
)
TARGETS = {"copying": 2.0, "copying, started": 2.0, "prose": 0.97, "8 concurrent": 1.0}


def chat(tokenizer: Any, user: str, reply_start: str = "") -> list[int]:
    text = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{reply_start}"
    tokens: list[int] = tokenizer.encode(text)
    return tokens


def workloads(loaded: Any) -> dict[str, list[tuple[list[int], Ask]]]:
    tokenizer = loaded.tokenizer
    grammar = build_grammar(
        OutputConstraint(tools=[EDIT], tool_mode="required", parallel_calls=False, call_format=HERMES,
                         eos=tuple(sorted(tokenizer.eos_token_ids))),
        grammar_writer(tokenizer),
    )  # fmt: skip
    read_result = f"<tool_response>\n{FILE}\n</tool_response>"
    edit_ask = (f"Read handlers.py:\n{read_result}\nReplace this block:\n{BLOCK}\nCall edit_file with old_string "
                "set to exactly that block.")  # fmt: skip
    edit = chat(tokenizer, edit_ask)
    rewrite = f"Here is a file:\n{FILE}\nWrite it out again with item_7's default changed to 70."
    repeat = chat(tokenizer, rewrite)
    # The 135M model does not copy on its own (its old_string is "old_string"): the "started" variants begin
    # its reply as a model that copies would, and measure decoding the rest.
    first_lines = "\n".join(BLOCK.splitlines()[:2])
    call_start = '<tool_call>\n{"name": "edit_file", "arguments": {"path": "handlers.py", "old_string": "'
    edit_started = chat(tokenizer, edit_ask, call_start + first_lines.replace("\n", "\\n"))
    repeat_started = chat(tokenizer, rewrite, "\n".join(CHANGED.splitlines()[:3]))
    prose = chat(tokenizer, "Write a long, varied story about a lighthouse keeper, the sea and a storm.")
    return {
        "copying": [
            (edit, ask(400, grammar, temperature=0.0)),
            (repeat, ask(400, temperature=0.0)),
        ],
        "copying, started": [
            (edit_started, ask(400, temperature=0.0)),
            (repeat_started, ask(400, temperature=0.0)),
        ],
        "prose": [(prose, ask(300, temperature=0.0))],
    }


def engine(loaded: Any, mode: SpeculativeMode) -> GenerationEngine:
    cache = KVPromptCache.for_model(loaded.model, loaded.identity, 0, 2**30)  # no prompt cache: cold every time
    return GenerationEngine(loaded, cache, EngineOptions(8, 8, 2**31, None, mode))


async def one(engine_: GenerationEngine, prompt: list[int], settings: Ask) -> tuple[str, GenerationStats]:
    return await engine_.complete(settings.request(prompt))


async def measure(loaded: Any, runs: int) -> int:
    engines = {mode: engine(loaded, mode) for mode in ("off", "prompt-lookup")}
    missed: list[str] = []
    print(f"{'workload':<18} {'off tok/s':>10} {'lookup tok/s':>13} {'ratio':>6} {'acceptance':>11} {'same':>5}")
    for name, requests in workloads(loaded).items():
        speeds: dict[str, list[float]] = {"off": [], "prompt-lookup": []}
        texts: dict[str, list[str]] = {"off": [], "prompt-lookup": []}
        drafted = accepted = 0
        for _ in range(runs):
            for prompt, settings in requests:
                for mode, engine_ in engines.items():
                    text, stats = await one(engine_, prompt, settings)
                    speeds[mode].append(stats.tokens_per_second)
                    texts[mode].append(text)
                    drafted += stats.drafted_tokens
                    accepted += stats.accepted_tokens
        ratio = statistics.median(speeds["prompt-lookup"]) / statistics.median(speeds["off"])
        same = texts["off"] == texts["prompt-lookup"]
        report(name, statistics.median(speeds["off"]), statistics.median(speeds["prompt-lookup"]), ratio,
               accepted / drafted if drafted else 0.0, same, missed)  # fmt: skip
    mixed = [request for requests in workloads(loaded).values() for request in requests]
    clients = [mixed[index % len(mixed)] for index in range(8)]
    totals: dict[str, float] = {}
    outputs: dict[str, list[str]] = {}
    drafted = accepted = 0
    for mode, engine_ in engines.items():
        started = time.perf_counter()
        results = await asyncio.gather(*(one(engine_, prompt, settings) for prompt, settings in clients))
        totals[mode] = sum(stats.completion_tokens for _, stats in results) / (time.perf_counter() - started)
        outputs[mode] = [text for text, _ in results]
        drafted += sum(stats.drafted_tokens for _, stats in results)
        accepted += sum(stats.accepted_tokens for _, stats in results)
    report("8 concurrent", totals["off"], totals["prompt-lookup"], totals["prompt-lookup"] / totals["off"],
           accepted / drafted if drafted else 0.0, outputs["off"] == outputs["prompt-lookup"], missed)  # fmt: skip
    for engine_ in engines.values():
        engine_.shutdown()
    return report_targets(missed)


def report(
    name: str, off: float, lookup: float, ratio: float, acceptance: float, same: bool, missed: list[str]
) -> None:
    print(f"{name:<18} {off:>10.1f} {lookup:>13.1f} {ratio:>5.2f}x {acceptance:>11.2f} {'yes' if same else 'NO':>5}")
    if ratio < TARGETS[name]:
        missed.append(f"{name}: {ratio:.2f}x < {TARGETS[name]}x")
    if not same:
        missed.append(f"{name}: the text differs from --speculative off")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    arguments = parser.parse_args()
    return asyncio.run(measure(load_model(None), arguments.runs))


if __name__ == "__main__":
    sys.exit(main())
