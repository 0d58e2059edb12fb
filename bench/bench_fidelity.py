"""What batching and a quantized KV cache change in the output, and what the quantized cache saves.

Two measurements on the bundled model, in-process on the server's own engine:

1. **Batch invariance.** Greedy requests decoded alone, then the same requests
   decoded together in one batch: the share whose text is identical, and for
   the others the token where they first differ.  Batched matrix products
   group floating-point sums differently, so a near-tie between two tokens can
   flip; this measures how often that happens.
2. **--kv-bits.** The same greedy long-context request with the KV cache in
   float32 (batched engine, one request), 8 bits and 4 bits: KV bytes per
   token, decode speed and time to first token as ratios to float32, and how
   many of the generated tokens agree with float32's.

    python bench/bench_fidelity.py [--requests 24] [--tokens 48]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]

from mlx_server.blas import preload_optimized_blas  # noqa: E402

preload_optimized_blas(None)

from mlx_server.chat.prompts import ChatTemplate  # noqa: E402
from mlx_server.engine.generation import EngineOptions, GenerationEngine  # noqa: E402
from mlx_server.engine.prompt_cache import KVPromptCache  # noqa: E402
from mlx_server.model.loading import LoadedModel, load_model  # noqa: E402
from mlx_server.vocabulary import Message  # noqa: E402
from testbed.requests import Ask, ask  # noqa: E402

TOPICS = [
    "the capital of France",
    "why the sky is blue",
    "how a bicycle stays upright",
    "the water cycle",
    "what a compiler does",
    "how bees make honey",
    "the rules of chess",
    "why leaves change colour",
    "how a rainbow forms",
    "what DNA is",
    "how an airplane flies",
    "the phases of the moon",
]


@dataclass
class Reply:
    tokens: list[int]  # the reply's text re-encoded: where two replies first differ
    completion_tokens: int
    tokens_per_second: float
    ttft_ms: float


def questions(count: int) -> list[str]:
    styles = ["Explain {} in two sentences.", "Tell a child about {}.", "Give three facts about {}."]
    return [styles[index // len(TOPICS) % len(styles)].format(TOPICS[index % len(TOPICS)]) for index in range(count)]


async def generate(engine: GenerationEngine, prompt: list[int], settings: Ask) -> Reply:
    text, stats = await engine.complete(settings.request(prompt, use_cache=False))
    tokens = list(engine.tokenizer.encode(text, add_special_tokens=False))
    return Reply(tokens, stats.completion_tokens, stats.tokens_per_second, stats.time_to_first_token_ms)


def first_difference(a: list[int], b: list[int]) -> int | None:
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def make_engine(loaded: LoadedModel, max_batch: int = 16, kv_bits: int | None = None) -> GenerationEngine:
    cache = KVPromptCache.for_model(loaded.model, loaded.identity, max_entries=0, max_bytes=0)
    engine = GenerationEngine(loaded, cache, EngineOptions(max_batch, 8, 2**32, kv_bits))
    engine.warm_up()
    return engine


def batch_invariance(loaded: LoadedModel, count: int, tokens: int) -> None:
    engine = make_engine(loaded, max_batch=8)
    settings = ask(tokens, temperature=0.0)
    template = ChatTemplate(engine.tokenizer)
    prompts = [template.tokens([Message("user", question)]) for question in questions(count)]
    alone = [asyncio.run(generate(engine, prompt, settings)) for prompt in prompts]

    async def together(group: list[list[int]]) -> list[Reply]:
        return list(await asyncio.gather(*(generate(engine, prompt, settings) for prompt in group)))

    batched: list[Reply] = []
    for start in range(0, count, 8):
        batched.extend(asyncio.run(together(prompts[start : start + 8])))
    engine.shutdown()
    differences = [first_difference(a.tokens, b.tokens) for a, b in zip(alone, batched)]
    diverged = [index for index in differences if index is not None]
    print(f"\nBatch invariance: {count} greedy requests of up to {tokens} tokens, alone and in batches of 8")
    print(f"  identical: {count - len(diverged)} of {count} ({(count - len(diverged)) / count:.0%})")
    if diverged:
        print(f"  the others first differ at token {sorted(diverged)} (median {statistics.median(diverged):.0f})")


def kv_quantization(loaded: LoadedModel, tokens: int, trials: int) -> None:
    filler = " ".join(f"Line {index}: the service restarted and wrote its status to the log." for index in range(90))
    messages = [Message("user", f"{filler}\nSummarize the log above in one paragraph.")]
    settings = ask(tokens, temperature=0.0)
    rows: list[tuple[str, int, float, float, list[int]]] = []
    for label, bits in (("float32 (batched engine)", None), ("--kv-bits 8", 8), ("--kv-bits 4", 4)):
        engine = make_engine(loaded, kv_bits=bits)
        prompt = ChatTemplate(engine.tokenizer).tokens(messages)
        replies = [asyncio.run(generate(engine, prompt, settings)) for _ in range(trials)]
        speed = statistics.median(reply.tokens_per_second for reply in replies)
        ttft = statistics.median(reply.ttft_ms for reply in replies)
        rows.append((label, engine.stats().kv_bytes_per_token, speed, ttft, replies[0].tokens))
        engine.shutdown()
    print(f"\nKV cache quantization: a {len(prompt):,}-token prompt, {tokens} greedy tokens, median of {trials}")
    print("| KV cache | bytes/token | ratio | decode tok/s | ratio | TTFT (ms) | ratio | tokens as float32 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    _, base_bytes, base_speed, base_ttft, base_tokens = rows[0]
    for label, per_token, speed, ttft, generated in rows:
        same = first_difference(base_tokens, generated)
        agreement = "all" if same is None else f"first {same}"
        print(
            f"| {label} | {per_token:,} | {per_token / base_bytes:.2f}x | {speed:.1f} | {speed / base_speed:.2f}x"
            f" | {ttft:,.0f} | {ttft / base_ttft:.2f}x | {agreement} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--kv-tokens", type=int, default=96)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    loaded = load_model(args.model)
    batch_invariance(loaded, args.requests, args.tokens)
    kv_quantization(loaded, args.kv_tokens, args.trials)


if __name__ == "__main__":
    main()
