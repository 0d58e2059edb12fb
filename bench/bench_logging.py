#!/usr/bin/env python3
"""What a utils_logging call costs, as ratios against stdlib logging measured in the same run.

    make bench-logging        (or: .venv/bin/python bench/bench_logging.py)

Targets (from the issue that introduced the module):
  * a disabled ``debug(2, "msg", {...})`` costs at most 0.6x a disabled stdlib
    ``logger.debug("%s", x)``;
  * an enabled ``debug()`` of a 10-key dict written to a stream costs at most
    1.2x stdlib logging of ``json.dumps`` of the same dict.

structlog and loguru rows are added when those packages are installed.  Every
case writes to the same /dev/null stream; each figure is the best of several
interleaved repeats, which is the least noisy estimate on a shared machine.
Exits 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import utils_logging

FORMAT = "[%(asctime)s] [%(name)s] %(levelname)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


@dataclass
class Case:
    name: str
    call: Callable[[], object]
    baseline: str | None = None
    target: float | None = None
    best_ns: float = float("inf")


def _stdlib_logger(stream: TextIO, level: int) -> logging.Logger:
    logger = logging.getLogger(f"bench.stdlib.{logging.getLevelName(level)}")
    logger.handlers.clear()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger


def _ten_keys(seed: int) -> dict[str, object]:
    return {
        "model": "qwen2.5-7b",
        "request": f"chatcmpl-{seed:08d}",
        "prompt_tokens": 1200 + seed % 7,
        "completion_tokens": 64,
        "cached_tokens": 1024,
        "temperature": 0.7,
        "stream": True,
        "finish_reason": "stop",
        "ttft_ms": 12.5 + seed % 3,
        "note": f"turn {seed} of the agent loop",
    }


def _optional_cases(stream: TextIO, data: dict[str, object]) -> list[Case]:
    cases: list[Case] = []
    try:
        import structlog  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        print("structlog: not installed, rows skipped")
    else:
        enabled = structlog.wrap_logger(
            structlog.PrintLogger(stream),
            processors=[structlog.processors.TimeStamper(fmt="iso"), structlog.processors.JSONRenderer()],
        ).bind()  # bind() resolves the lazy proxy, which would otherwise rebuild the logger per call
        disabled = structlog.wrap_logger(
            structlog.PrintLogger(stream), wrapper_class=structlog.make_filtering_bound_logger(logging.INFO)
        ).bind()
        cases.append(Case("structlog: disabled debug", lambda: disabled.debug("msg", **data), "stdlib: disabled"))
        cases.append(Case("structlog: enabled, JSON", lambda: enabled.info("msg", **data), "stdlib: enabled"))
    try:
        from loguru import logger as loguru_logger  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        print("loguru: not installed, rows skipped")
    else:
        loguru_logger.remove()
        loguru_logger.add(stream, level="INFO", format="[{time}] {level}: {message}")
        cases.append(Case("loguru: disabled debug", lambda: loguru_logger.debug("msg {}", data), "stdlib: disabled"))
        cases.append(Case("loguru: enabled", lambda: loguru_logger.info("msg {}", json.dumps(data)), "stdlib: enabled"))
    return cases


def run(number: int, repeats: int) -> bool:
    """Measure every case, print the table, and say whether the targets hold."""
    stream = open(os.devnull, "w")  # noqa: SIM115 - lives for the whole run
    data = _ten_keys(0)
    fresh = [_ten_keys(seed) for seed in range(1, number + 1)]
    fresh_iterator: dict[str, Any] = {"stdlib": iter(fresh * (repeats + 1)), "ours": iter(fresh * (repeats + 1))}

    stdlib_disabled = _stdlib_logger(stream, logging.INFO)
    disabled_cases = [
        Case("stdlib: disabled", lambda: stdlib_disabled.debug("%s", data)),
        Case("utils_logging: disabled debug(2)", lambda: utils_logging.debug(2, "msg", data), "stdlib: disabled", 0.6),
    ]
    stdlib_enabled = _stdlib_logger(stream, logging.DEBUG)
    enabled_cases = [
        Case("stdlib: enabled", lambda: stdlib_enabled.debug("%s", json.dumps(data))),
        Case("utils_logging: enabled debug(1)", lambda: utils_logging.debug(1, "msg", data), "stdlib: enabled", 1.2),
        Case(
            "stdlib: enabled, new values each call",
            lambda: stdlib_enabled.debug("%s", json.dumps(next(fresh_iterator["stdlib"]))),
        ),
        Case(
            "utils_logging: new values each call",
            lambda: utils_logging.debug(1, "msg", next(fresh_iterator["ours"])),
            "stdlib: enabled, new values each call",
        ),
    ]
    optional = _optional_cases(stream, data)

    with contextlib.redirect_stderr(stream):
        utils_logging.set_debug_level(0)
        _measure(disabled_cases + [case for case in optional if "disabled" in case.name], number * 5, repeats)
        utils_logging.set_debug_level(1)
        _measure(enabled_cases + [case for case in optional if "disabled" not in case.name], number, repeats)
    return _report(disabled_cases + enabled_cases + optional)


def _measure(cases: list[Case], number: int, repeats: int) -> None:
    for _ in range(repeats):  # interleaved, so drift in machine load hits every case alike
        for case in cases:
            seconds = timeit.timeit(case.call, number=number)
            case.best_ns = min(case.best_ns, seconds / number * 1e9)


def _report(cases: list[Case]) -> bool:
    by_name = {case.name: case for case in cases}
    print(f"\n| {'case':40} | {'ns/call':>8} | {'ratio':>6} | {'target':>13} |")
    print(f"|{'-' * 42}|{'-' * 9}:|{'-' * 7}:|{'-' * 14}:|")
    all_met = True
    for case in cases:
        ratio = "" if case.baseline is None else f"{case.best_ns / by_name[case.baseline].best_ns:.2f}x"
        target = ""
        if case.target is not None:
            met = case.best_ns / by_name[str(case.baseline)].best_ns <= case.target
            all_met &= met
            target = f"<={case.target}x {'ok' if met else 'MISSED'}"
        print(f"| {case.name:40} | {case.best_ns:8.0f} | {ratio:>6} | {target:>13} |")
    print(f"\nratios are against the stdlib row each case names; python {sys.version.split()[0]}")
    return all_met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--number", type=int, default=20_000, help="calls per timing (default 20000)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats; the best is kept (default 7)")
    arguments = parser.parse_args()
    sys.exit(0 if run(arguments.number, arguments.repeats) else 1)


if __name__ == "__main__":
    main()
