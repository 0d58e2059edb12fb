"""Quantized GGUF weights: kept quantized on a GPU, dequantized on a CPU only while float32 fits in memory."""

from __future__ import annotations

import pytest

from mlx_server.model.weight_format import FLOAT32_MEMORY_SHARE, choose_weight_format

GIB = 1024**3


class TestChooseWeightFormat:
    def test_a_gpu_keeps_them_quantized(self) -> None:
        """Metal's quantized kernels are fast; float32 would multiply the memory about eight times."""
        choice = choose_weight_format("gpu", float32_bytes=28 * GIB, physical_memory=64 * GIB)
        assert not choice.dequantize and "gpu" in choice.reason

    def test_a_gpu_keeps_even_a_small_model_quantized(self) -> None:
        assert not choose_weight_format("gpu", float32_bytes=GIB // 2, physical_memory=64 * GIB).dequantize

    def test_a_cpu_dequantizes_what_fits_its_share(self) -> None:
        """The default model on this machine: ~0.5 GiB of float32 in 24 GiB."""
        choice = choose_weight_format("cpu", float32_bytes=GIB // 2, physical_memory=24 * GIB)
        assert choice.dequantize
        assert "0.50 GiB as float32 fits 25% of 24.0 GiB memory" in choice.reason

    def test_a_cpu_keeps_a_model_quantized_when_float32_would_not_fit(self) -> None:
        """A 4 GB Q4 coding model is ~28 GB as float32: kept quantized, and the line says how to force it."""
        choice = choose_weight_format("cpu", float32_bytes=28 * GIB, physical_memory=24 * GIB)
        assert not choice.dequantize
        assert "would exceed 25% of 24.0 GiB memory" in choice.reason and "--dequantize" in choice.reason

    def test_the_share_is_the_boundary(self) -> None:
        memory = 16 * GIB
        at_share = int(memory * FLOAT32_MEMORY_SHARE)
        assert choose_weight_format("cpu", at_share, memory).dequantize
        assert not choose_weight_format("cpu", at_share + 1, memory).dequantize

    @pytest.mark.parametrize("device", ["cpu", "gpu"])
    @pytest.mark.parametrize(("requested", "flag"), [(True, "--dequantize"), (False, "--keep-quantized")])
    def test_a_flag_overrides_the_choice(self, device: str, requested: bool, flag: str) -> None:
        choice = choose_weight_format(device, float32_bytes=28 * GIB, physical_memory=24 * GIB, requested=requested)
        assert choice.dequantize is requested and choice.reason.startswith(flag)

    def test_unknown_memory_on_a_cpu_dequantizes(self) -> None:
        choice = choose_weight_format("cpu", float32_bytes=GIB, physical_memory=None)
        assert choice.dequantize and "unknown" in choice.reason
