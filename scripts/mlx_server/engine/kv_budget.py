"""The KV memory budget: sequences decoding and the prompt cache share one bound, so memory is governed.

A batch's KV caches are rectangular: mlx-lm left-pads every sequence to the
longest and grows all of them in steps of 256 tokens.  A batch of ``n``
sequences whose longest may reach ``L`` tokens (prompt plus every token it may
generate) can therefore hold ``n * ceil(L / 256) * 256`` tokens of KV state.
A request joins the batch only when that projection, with it included, fits
the budget; the prompt cache is trimmed to what is left.  A request that
cannot fit even alone is refused before it queues.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_server.machine import physical_memory_bytes

__all__ = ["KV_STEP", "KVBudget", "default_budget_bytes"]

KV_STEP = 256


def default_budget_bytes() -> int:
    """A quarter of physical memory (at least 256 MiB): room for KV state without starving the model."""
    physical = physical_memory_bytes() or 8 * 1024**3
    return max(256 * 1024**2, physical // 4)


@dataclass(frozen=True)
class KVBudget:
    total_bytes: int
    bytes_per_token: int

    def batch_bytes(self, final_lengths: list[int]) -> int:
        """The most a batch of sequences that may reach these lengths can hold."""
        if not final_lengths:
            return 0
        longest = -(-max(final_lengths) // KV_STEP) * KV_STEP
        return len(final_lengths) * longest * self.bytes_per_token

    def fits(self, final_lengths: list[int]) -> bool:
        return self.batch_bytes(final_lengths) <= self.total_bytes

    @property
    def max_sequence_tokens(self) -> int:
        """The longest one sequence may grow when it decodes alone."""
        return (self.total_bytes // max(1, self.bytes_per_token)) // KV_STEP * KV_STEP
