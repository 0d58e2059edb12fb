"""Turn a GGUF file into an mlx-lm model and a Hugging Face fast tokenizer.

MLX reads GGUF natively (``mx.load``): Q4_0/Q4_1/Q8_0 tensors arrive as MLX
quantized triples (weight, scales, biases; group size 32), other types as
float16.  What MLX does not do is name the tensors the way mlx-lm's models
expect, describe the architecture as an mlx-lm config, or build the tokenizer:
that is this module.  (transformers can read a GGUF tokenizer too, but only
with PyTorch installed, several gigabytes for one lookup table.)
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mlx_server.machine import physical_memory_bytes
from mlx_server.model.weight_format import WeightFormat, choose_weight_format

__all__ = ["GGUF_GROUP_SIZE", "SUPPORTED_ARCHITECTURES", "GgufModel", "UnsupportedGgufError", "load_gguf"]

GGUF_GROUP_SIZE = 32
SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor names -> mlx-lm (Hugging Face) names.
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(\w+)$")

# GGUF token types (llama.cpp's llama_token_type): 3 control, 4 user-defined.
_SPECIAL_TOKEN_TYPES = (3, 4)

# Pre-tokenizer regexes by ``tokenizer.ggml.pre``, as llama.cpp applies them.
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PATTERN = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_PATTERNS: dict[str, tuple[bool, str]] = {  # name -> (split digits first, pattern)
    **dict.fromkeys(("default", "gpt2", "mpt", "olmo", "jais"), (False, _GPT2_PATTERN)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"), (True, _GPT2_PATTERN)),
    **dict.fromkeys(("llama3", "llama-bpe", "smaug-bpe", "dbrx"), (False, _LLAMA3_PATTERN)),
    **dict.fromkeys(("qwen2", "stablelm2", "deepseek-r1-qwen"), (False, _QWEN2_PATTERN)),
}


class UnsupportedGgufError(ValueError):
    """The GGUF file uses an architecture or tokenizer this loader does not handle."""


@dataclass
class GgufModel:
    """A loaded GGUF model: the mlx-lm module, its tokenizer, and the config that rebuilds it."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerFast
    config: dict[str, Any]
    context_length: int
    quantized: bool
    weight_format: str  # why the weights are in the format they are, for the start-up line
    warnings: list[str]


def _scalar(metadata: dict[str, Any], key: str, default: Any = None) -> Any:
    value = metadata.get(key, default)
    if isinstance(value, mx.array):
        return value.item()
    return value


def _model_config(metadata: dict[str, Any], tensors: dict[str, mx.array]) -> dict[str, Any]:
    """An mlx-lm ``config.json`` equivalent for a llama-architecture GGUF."""
    architecture = _scalar(metadata, "general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedGgufError(
            f"GGUF architecture {architecture!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)}); "
            "convert the model with mlx_lm.convert and pass the MLX directory instead"
        )

    def field(name: str, default: Any = None) -> Any:
        return _scalar(metadata, f"{architecture}.{name}", default)

    heads = int(field("attention.head_count"))
    hidden = int(field("embedding_length"))
    config: dict[str, Any] = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": int(field("block_count")),
        "intermediate_size": int(field("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field("attention.head_count_kv", heads)),
        "head_dim": int(field("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(field("attention.layer_norm_rms_epsilon", 1e-5)),
        "vocab_size": len(metadata["tokenizer.ggml.tokens"]),
        "rope_theta": float(field("rope.freq_base", 10_000.0)),
        # llama.cpp permutes Q and K for interleaved RoPE when it writes llama GGUFs.
        "rope_traditional": True,
        "tie_word_embeddings": "output.weight" not in tensors,
        "max_position_embeddings": int(field("context_length", 2048)),
    }
    scaling = field("rope.scaling.type")
    if scaling and scaling != "none":
        config["rope_scaling"] = {"type": scaling, "factor": float(field("rope.scaling.factor", 1.0))}
    return config


def _rename(gguf_name: str) -> str:
    base, _, kind = gguf_name.rpartition(".")
    layer = _LAYER_NAME.match(base)
    if layer:
        target = _LAYER_TENSORS.get(layer.group(2))
        if target is None:
            raise UnsupportedGgufError(f"unexpected GGUF tensor {gguf_name!r}")
        return f"model.layers.{layer.group(1)}.{target}.{kind}"
    if base not in _GLOBAL_TENSORS:
        raise UnsupportedGgufError(f"unexpected GGUF tensor {gguf_name!r}")
    return f"{_GLOBAL_TENSORS[base]}.{kind}"


def _quantization_bits(weights: dict[str, mx.array]) -> dict[str, int]:
    """Bits per weight of each quantized module, inferred from the packed shapes."""
    bits: dict[str, int] = {}
    for name, scales in weights.items():
        if name.endswith(".scales"):
            module = name[: -len(".scales")]
            packed = weights[f"{module}.weight"]
            bits[module] = packed.shape[-1] * 32 // (scales.shape[-1] * GGUF_GROUP_SIZE)
    return bits


def _float32_bytes(weights: dict[str, mx.array], bits: dict[str, int]) -> int:
    """What the weights would take as float32: a quantized weight holds 32 / bits values per uint32."""
    total = 0
    for name, tensor in weights.items():
        module, _, kind = name.rpartition(".")
        if module in bits and kind in ("scales", "biases"):
            continue
        values = tensor.size * 32 // bits[module] if module in bits and kind == "weight" else tensor.size
        total += values * 4
    return total


def _build_model(config: dict[str, Any], weights: dict[str, mx.array], dequantize: bool) -> nn.Module:
    """Instantiate the mlx-lm model, load the weights, and dequantize them to float32 when asked to."""
    architecture = importlib.import_module(f"mlx_lm.models.{config['model_type']}")  # one of SUPPORTED_ARCHITECTURES
    model = architecture.Model(architecture.ModelArgs.from_dict(config))
    bits = _quantization_bits(weights)
    if bits:
        nn.quantize(
            model,
            class_predicate=lambda path, _module: (
                {"group_size": GGUF_GROUP_SIZE, "bits": bits[path], "mode": "affine"} if path in bits else False
            ),
        )
    model.load_weights(list(weights.items()), strict=True)
    if bits and dequantize:
        from mlx_lm.utils import dequantize_model

        dequantize_model(model)
        model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    model.eval()
    return model


def _pre_tokenizer(name: str, warnings: list[str]) -> pre_tokenizers.PreTokenizer:
    split_digits, pattern = _PRE_TOKENIZER_PATTERNS.get(name, (False, _GPT2_PATTERN))
    if name not in _PRE_TOKENIZER_PATTERNS:
        warnings.append(f"unknown GGUF pre-tokenizer {name!r}; using GPT-2's, tokenization may differ slightly")
    steps: list[pre_tokenizers.PreTokenizer] = []
    if split_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if pattern == _GPT2_PATTERN:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)


def _build_tokenizer(metadata: dict[str, Any], warnings: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer from the vocabulary, merges and token types in the metadata."""
    kind = _scalar(metadata, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedGgufError(
            f"GGUF tokenizer model {kind!r} is not supported (supported: 'gpt2', byte-level BPE); "
            "convert the model with mlx_lm.convert and pass the MLX directory instead"
        )
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]
    backend = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = _pre_tokenizer(str(_scalar(metadata, "tokenizer.ggml.pre", "default")), warnings)
    backend.decoder = decoders.ByteLevel()
    token_types = metadata["tokenizer.ggml.token_type"].tolist()
    backend.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token, token_type in zip(tokens, token_types)
            if token_type in _SPECIAL_TOKEN_TYPES
        ]
    )

    def token_for(key: str) -> str | None:
        index = _scalar(metadata, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token_for("bos"),
        eos_token=token_for("eos"),
        unk_token=token_for("unknown"),
        pad_token=token_for("padding"),
        add_bos_token=bool(_scalar(metadata, "tokenizer.ggml.add_bos_token", False)),
    )
    template = metadata.get("tokenizer.chat_template")
    if isinstance(template, str):
        tokenizer.chat_template = template
    return tokenizer


def load_gguf(path: Path, dequantize: bool | None = None) -> GgufModel:
    """Load a llama-architecture GGUF; raises UnsupportedGgufError naming what is not supported.

    ``dequantize`` None lets weight_format.choose_weight_format decide from the
    device and memory; True or False is the command line's explicit choice.
    """
    try:
        loaded = cast("tuple[dict[str, mx.array], dict[str, Any]]", mx.load(str(path), return_metadata=True))
    except RuntimeError as error:  # MLX reports unreadable files as RuntimeError
        raise ValueError(f"MLX could not read it: {error}") from error
    tensors, metadata = loaded
    config = _model_config(metadata, tensors)
    weights = {_rename(name): tensor for name, tensor in tensors.items()}
    warnings: list[str] = []
    bits = _quantization_bits(weights)
    if bits:
        device = "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"
        weight_format = choose_weight_format(device, _float32_bytes(weights, bits), physical_memory_bytes(), dequantize)
    else:
        weight_format = WeightFormat(False, "not quantized in the file")
    model = _build_model(config, weights, weight_format.dequantize)
    quantized = bool(bits) and not weight_format.dequantize
    if quantized:
        config["quantization"] = {"group_size": GGUF_GROUP_SIZE, "bits": max(bits.values()), "mode": "affine"}
        config["quantization"].update(
            {module: {"group_size": GGUF_GROUP_SIZE, "bits": b} for module, b in bits.items()}
        )
    tokenizer = _build_tokenizer(metadata, warnings)
    return GgufModel(
        model=model,
        tokenizer=tokenizer,
        config=config,
        context_length=int(config["max_position_embeddings"]),
        quantized=quantized,
        weight_format=weight_format.reason,
        warnings=warnings,
    )
