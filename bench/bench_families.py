#!/usr/bin/env python3
"""The prompt cache on every model family, against a dense model with the same tokenizer, in one run.

    make bench-families        (or: .venv/bin/python bench/bench_families.py)

Each family is a tiny random-weight model built from mlx-lm's own class with
its real tokenizer (as in ``tests/families``), served in-process by the real
application.  Its dense twin is mlx-lm's ``llama`` class with the same
tokenizer and chat template, so both see the same tokens and differ only in
their KV caches (trimmable ``KVCache`` against rotating, recurrent and MoE
layers).

Workload: a growing conversation of 8 turns, a ~700-token system prompt and
~170-token user turns, greedy replies of up to 24 tokens.  Twice: with each
reply sent back as generated, and with the first half of each reply dropped
(as templates and Claude Code drop reasoning: the history no longer matches
what was generated).  Every turn also goes to a twin server with the prompt
cache off, and the replies must be identical.

Targets: on turns 2-8, every family's cached share within 0.03 of its dense
twin's and at least 0.85; every reply identical to the uncached server's.
Exits 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from serverlib import report_targets

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]

from mlx_server.blas import preload_optimized_blas  # noqa: E402

preload_optimized_blas()  # before MLX is imported, as the server does

from mlx_server.model.loading import load_model  # noqa: E402
from testbed.serving import serve  # noqa: E402
from testbed.tiny_models import FAMILIES, Family, build  # noqa: E402

TURNS = 8
REPLY_TOKENS = 24
SHARE_TOLERANCE = 0.03
SHARE_FLOOR = 0.85
SYSTEM = (
    "You are a coding agent working in a large repository. Read files before you change them, keep changes small, "
    "run the tests after every change, and explain what you did in one short paragraph. "
) * 16
USER = (
    "Here is the next step of the task. Look at the module that handles the request, find where the settings are "
    "read, and tell me which of them are read twice and why that matters for the cache that keeps the prompt. "
) * 4


@dataclass
class Run:
    """One family's shares per turn (turns 2-8) and whether every reply matched the uncached server's."""

    shares: list[float]
    identical: int  # turns whose reply matched the uncached server's


def dense_twin(family: Family) -> Family:
    """The llama class with ``family``'s tokenizer and template: trimmable caches, the same tokens."""
    dense = FAMILIES["llama"]
    return replace(family, name=f"dense ({family.tokenizer})", config=dense.config)


def converse(directory: Path, drop_reasoning: bool) -> Run:
    loaded = load_model(str(directory))
    engine, client = serve(loaded, 32)
    uncached_engine, uncached = serve(loaded, 0)
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
    shares, identical = [], 0
    try:
        for turn in range(TURNS):
            messages.append({"role": "user", "content": f"Step {turn}. {USER}"})
            request = {"messages": messages, "max_tokens": REPLY_TOKENS, "temperature": 0.0}
            body = client.post("/v1/chat/completions", json=request).json()
            reference = uncached.post("/v1/chat/completions", json=request).json()
            identical += body["choices"][0]["message"] == reference["choices"][0]["message"]
            usage = body["usage"]
            if turn:
                shares.append(usage["prompt_tokens_details"]["cached_tokens"] / usage["prompt_tokens"])
            reply = body["choices"][0]["message"]["content"] or ""
            messages.append({"role": "assistant", "content": reply[len(reply) // 2 :] if drop_reasoning else reply})
    finally:
        engine.shutdown()
        uncached_engine.shutdown()
    return Run(shares, identical)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="*", default=[name for name in FAMILIES if name != "llama"])
    arguments = parser.parse_args()
    missed: list[str] = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        twins: dict[str, Path] = {}
        print(f"{'family':<22} {'history':<17} {'turns 2-8 cached share':<52} {'min':>5} {'dense':>6} {'same':>5}")
        for name in arguments.families:
            family = FAMILIES[name]
            directory = build(family, root / name)
            if family.tokenizer not in twins:
                twin = dense_twin(family)
                twins[family.tokenizer] = build(twin, root / f"dense-{family.tokenizer}")
            for drop in (False, True):
                run = converse(directory, drop)
                dense = converse(twins[family.tokenizer], drop)
                history = "reasoning dropped" if drop else "as generated"
                shares = " ".join(f"{share:.2f}" for share in run.shares)
                worst_gap = max(d - s for s, d in zip(run.shares, dense.shares))
                print(f"{name:<22} {history:<17} {shares:<52} {min(run.shares):>5.2f} {min(dense.shares):>6.2f} "
                      f"{run.identical:>3}/{TURNS}")  # fmt: skip
                if worst_gap > SHARE_TOLERANCE:
                    missed.append(f"{name} ({history}): {worst_gap:.3f} below its dense twin on some turn")
                if min(run.shares) < SHARE_FLOOR:
                    missed.append(f"{name} ({history}): a turn's share {min(run.shares):.2f} < {SHARE_FLOOR} "
                                  f"(its dense twin's lowest: {min(dense.shares):.2f})")  # fmt: skip
                if run.identical < TURNS:
                    missed.append(f"{name} ({history}): {TURNS - run.identical} repl(ies) differ from the uncached "
                                  "server's")  # fmt: skip
    print()
    return report_targets(missed)


if __name__ == "__main__":
    sys.exit(main())
