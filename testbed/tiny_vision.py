"""Tiny random-weight vision models from mlx-vlm's own classes (the vision extra), with real tokenizers.

Gemma 3 places image tokens at ordinary positions; the Qwen-VL families
(Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, and the MoE ones) place them on M-RoPE's 3-D grid, which
the Qwen3 tokenizer's vision tokens serve (they are Qwen-VL's).  Random weights write
random text, so what the tests compare is structure: equal outputs, a
share read from the cache.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from testbed.tiny_models import FAMILIES, SMALL, vocabulary_size
from testbed.tokenizers import tokenizer_directory

__all__ = ["QWEN_VISION_FAMILIES", "build_qwen_vision", "build_vision"]

#: The Qwen-VL families built here, by model type: the vision tower's patch side.  (Qwen3.5's own ~248k-token
#: tokenizer is in no npm package here: its tiny model has Qwen3's, whose vision tokens it is configured with.)
QWEN_VISION_FAMILIES = {"qwen2_vl": 14, "qwen2_5_vl": 14, "qwen3_vl": 16, "qwen3_vl_moe": 16, "qwen3_5": 16,
                        "qwen3_5_moe": 16}  # fmt: skip
#: The arrays scaled to make the language model's attention sharper than at random, and by how much
#: (see ``build_qwen_vision``; Qwen3's normalized queries and keys are scaled through their norms).
SHARPER_ATTENTION: dict[str, tuple[tuple[str, str], float]] = {
    "qwen2_vl": (("q_proj.weight", "k_proj.weight"), 8.0),
    "qwen2_5_vl": (("q_proj.weight", "k_proj.weight"), 8.0),
    **{family: (("q_norm.weight", "k_norm.weight"), 3.0) for family in ("qwen3_vl", "qwen3_vl_moe", "qwen3_5",
                                                                         "qwen3_5_moe")},
}  # fmt: skip
#: Qwen3.5's language model: Qwen3-Next's hybrid (linear attention every other layer), dense, partial M-RoPE.
QWEN3_5_TEXT = {
    **{key: value for key, value in FAMILIES["qwen3_next"].config.items()
       if key not in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step",
                      "shared_expert_intermediate_size", "mlp_only_layers", "partial_rotary_factor")},
    "tie_word_embeddings": True,
    "rope_parameters": {"type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e6, "partial_rotary_factor": 0.5,
                        "mrope_interleaved": True},
}  # fmt: skip
#: Experts for the MoE families (every layer's MLP a mixture; Qwen3.5 MoE's with a shared expert, as the real one).
QWEN_EXPERTS = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1,
                "mlp_only_layers": [], "shared_expert_intermediate_size": 32, "norm_topk_prob": True}  # fmt: skip
#: M-RoPE's settings for the families whose language model is built on Qwen3's tiny config (Qwen2-VL's and
#: Qwen2.5-VL's are Qwen2's, which takes the same keys).
QWEN_ROPE = {
    "qwen2_vl": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "qwen2_5_vl": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "qwen3_vl": {"type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
    "qwen3_vl_moe": {"type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
}
#: Each family's vision tower beyond the shared tiny settings (Qwen2-VL's names its width ``embed_dim`` and its
#: output ``hidden_size``; Qwen3-VL gets one deepstack layer, the real one has three).
QWEN_TOWER: dict[str, dict[str, Any]] = {
    "qwen2_vl": {"embed_dim": 32, "hidden_size": SMALL["hidden_size"], "mlp_ratio": 2},
    "qwen2_5_vl": {},
    **{family: {"num_position_embeddings": 64, "deepstack_visual_indexes": [0]} for family in ("qwen3_vl",
                                                                                                "qwen3_vl_moe")},
    **{family: {"num_position_embeddings": 64} for family in ("qwen3_5", "qwen3_5_moe")},
}  # fmt: skip
QWEN_PROCESSOR = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}  # the others: Qwen3-VL's


def qwen_text_config(family: str, vocabulary: int) -> dict[str, Any]:
    """The tiny language model's config for a Qwen-VL family."""
    experts = QWEN_EXPERTS if family.endswith("_moe") else {}
    if family.startswith("qwen3_5"):
        return {**QWEN3_5_TEXT, **experts, "model_type": family, "vocab_size": vocabulary}
    untied = {"tie_word_embeddings": False} if family == "qwen3_vl_moe" else {}  # mlx-lm's reads its own lm_head
    return {**FAMILIES["qwen3"].config, **experts, **untied, "model_type": family, "vocab_size": vocabulary,
            "rope_scaling": QWEN_ROPE[family]}  # fmt: skip


def build_vision(directory: Path, image_tokens: int = 16, image_size: int = 64) -> Path:
    """A tiny Gemma 3 vision model from mlx-vlm's own classes (the vision extra), with Gemma 3's real tokenizer.

    Its processor settings are written here: images resized to ``image_size``
    pixels a side, each read as ``image_tokens`` image tokens.  The language
    model ties its output layer to the embeddings, as Gemma 3 does, so that
    mlx-lm and mlx-vlm load the same weights.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_vlm.models import gemma3
    from mlx_vlm.utils import update_module_configs

    tokenizer = tokenizer_directory("gemma3")
    vocabulary = vocabulary_size(tokenizer / "tokenizer.json")
    text = {**FAMILIES["gemma3_text"].config, "vocab_size": vocabulary, "mm_tokens_per_image": image_tokens,
            "rope_global_base_freq": 1e6}  # fmt: skip
    config = {
        "model_type": "gemma3", "vocab_size": vocabulary, "image_token_index": 262144, "boi_token_index": 255999,
        "eoi_token_index": 256000, "mm_tokens_per_image": image_tokens, "hidden_size": SMALL["hidden_size"],
        "eos_token_id": [1, 106], "text_config": text,
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "num_hidden_layers": 2,
                          "intermediate_size": 64, "num_attention_heads": 2, "patch_size": 8,
                          "image_size": image_size},
    }  # fmt: skip
    mx.random.seed(0)
    model_config = update_module_configs(gemma3.ModelConfig.from_dict(config), gemma3, config, ["text", "vision"])
    model = gemma3.Model(model_config)
    mx.eval(model.parameters())
    arrays: dict[str, mx.array] = dict(tree_flatten(model.parameters()))
    weights = {name: value for name, value in arrays.items() if "lm_head" not in name}
    directory.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(directory / "model.safetensors"), weights)
    (directory / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, directory / name)
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Gemma3ImageProcessor", "processor_class": "Gemma3Processor",
        "size": {"height": image_size, "width": image_size}, "do_resize": True, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "do_convert_rgb": True, "resample": 2, "do_pan_and_scan": False,
    }))  # fmt: skip
    (directory / "processor_config.json").write_text(
        json.dumps({"image_seq_length": image_tokens, "processor_class": "Gemma3Processor"})
    )
    return directory


def build_qwen_vision(directory: Path, family: str, grid: int = 8, largest: int | None = None) -> Path:
    """A tiny Qwen-VL model (one of ``QWEN_VISION_FAMILIES``) with Qwen3's real tokenizer.

    Images are resized to about ``grid`` x ``grid`` patches (merged 2 x 2
    into image tokens: 16 at the default, on a 4 x 4 grid of positions), or
    between that and ``largest`` x ``largest`` by their own size.  At
    random initialization attention is so flat that a tiny model's greedy
    output barely depends on positions, and a test of M-RoPE's positions
    could not fail; so the language model's queries and keys are scaled up
    (the named arrays), which makes its output change when any token's
    position does.  Qwen3-VL gets one deepstack layer (the real one has three); Qwen3.5 is hybrid, as the
    real one is (linear attention with full attention every other layer); the MoE families have a mixture of
    experts in every layer.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_vlm.utils import get_model_and_args, update_module_configs

    patch = QWEN_VISION_FAMILIES[family]
    tokenizer = tokenizer_directory("qwen3")
    vocabulary = vocabulary_size(tokenizer / "tokenizer.json")
    text = qwen_text_config(family, vocabulary)
    vision = {"model_type": family, "depth": 2, "hidden_size": 32, "intermediate_size": 64,
              "out_hidden_size": SMALL["hidden_size"], "num_heads": 2, "patch_size": patch, "spatial_merge_size": 2,
              "temporal_patch_size": 2, "window_size": 4 * patch, "fullatt_block_indexes": [1], "in_channels": 3,
              **QWEN_TOWER[family]}  # fmt: skip
    config = {**{key: value for key, value in text.items() if key != "rope_scaling"}, "model_type": family,
              "text_config": text, "vision_config": vision, "image_token_id": 151655, "video_token_id": 151656,
              "vision_start_token_id": 151652, "vision_end_token_id": 151653,
              "eos_token_id": [151645, 151643]}  # fmt: skip
    mx.random.seed(0)
    module = get_model_and_args(config)[0]
    model = module.Model(update_module_configs(module.ModelConfig.from_dict(dict(config)), module, config,
                                               ["text", "vision"]))  # fmt: skip
    mx.eval(model.parameters())
    sharpened, factor = SHARPER_ATTENTION[family]
    arrays: dict[str, mx.array] = dict(tree_flatten(model.parameters()))
    weights = {
        name: value * factor if name.startswith("language_model.") and name.endswith(sharpened) else value
        for name, value in arrays.items()
        if "lm_head" not in name or not text.get("tie_word_embeddings")
    }
    directory.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(directory / "model.safetensors"), weights)
    (directory / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, directory / name)
    side = grid * patch
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": QWEN_PROCESSOR.get(family, "Qwen3VLProcessor"),
        "min_pixels": side * side, "max_pixels": (largest or grid) ** 2 * patch * patch, "patch_size": patch,
        "merge_size": 2, "temporal_patch_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "do_resize": True,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
    }))  # fmt: skip
    return directory
