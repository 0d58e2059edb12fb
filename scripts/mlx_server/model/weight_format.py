"""Whether quantized GGUF weights are dequantized to float32: a choice made from the device and the memory.

On a GPU (Metal on Apple Silicon, CUDA) MLX's quantized kernels are fast and
float32 would multiply the weights' memory about eight times (a 4 GB Q4 model
becomes 28 GB), so weights stay quantized.  On a CPU, float32 matrix products
through BLAS are several times faster than the quantized kernels, so weights
are dequantized, but only while the float32 copy fits FLOAT32_MEMORY_SHARE of
physical memory; a larger model stays quantized and the start-up line says so.
``--keep-quantized`` and ``--dequantize`` override the choice.

Mixture-of-experts layers are a special case on a CPU: MLX's CPU
``gather_mm`` takes only float32, so a float16 or bfloat16 MoE model cannot
run there as it is.  It is cast to float32 under the same memory rule, or
refused with a sentence that says what to do (``moe_on_cpu``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FLOAT32_MEMORY_SHARE", "UnrunnableModelError", "WeightFormat", "choose_weight_format", "moe_on_cpu"]

FLOAT32_MEMORY_SHARE = 0.25
_GIB = 1024**3


@dataclass(frozen=True)
class WeightFormat:
    dequantize: bool
    reason: str


def choose_weight_format(
    device: str, float32_bytes: int, physical_memory: int | None, requested: bool | None = None
) -> WeightFormat:
    """Dequantize or not; ``requested`` is the command line's explicit choice (None: decide)."""
    size = f"{float32_bytes / _GIB:.2f} GiB as float32"
    if requested is not None:
        flag = "--dequantize" if requested else "--keep-quantized"
        return WeightFormat(requested, f"{flag}, {size}")
    if device != "cpu":
        return WeightFormat(False, f"kept quantized for the {device}'s quantized kernels, {size}")
    if physical_memory is None:
        return WeightFormat(True, f"dequantized for CPU speed, {size}, memory size unknown")
    allowed = physical_memory * FLOAT32_MEMORY_SHARE
    share = f"{FLOAT32_MEMORY_SHARE:.0%} of {physical_memory / _GIB:.1f} GiB memory"
    if float32_bytes <= allowed:
        return WeightFormat(True, f"dequantized for CPU speed, {size} fits {share}")
    return WeightFormat(False, f"kept quantized, {size} would exceed {share}; --dequantize forces it")


class UnrunnableModelError(ValueError):
    """This model cannot run on this device as it is; the message says why and what to do instead."""


def moe_on_cpu(dtype: str, float32_bytes: int, physical_memory: int | None) -> WeightFormat:
    """Whether a half-precision MoE model on a CPU is cast to float32; UnrunnableModelError when it cannot be."""
    size = f"{float32_bytes / _GIB:.2f} GiB as float32"
    reason = f"its mixture-of-experts layers need float32 on a CPU (MLX's CPU gather_mm); {dtype} weights"
    if physical_memory is None or float32_bytes <= physical_memory * FLOAT32_MEMORY_SHARE:
        return WeightFormat(True, f"cast to float32: {reason}, {size}")
    share = f"{FLOAT32_MEMORY_SHARE:.0%} of {physical_memory / _GIB:.1f} GiB memory"
    raise UnrunnableModelError(
        f"{reason} would take {size}, over {share}; use a quantized version of the model "
        "(mlx_lm.convert -q; quantized experts run on a CPU), or run it on Apple Silicon's GPU"
    )
