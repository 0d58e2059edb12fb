"""The private parts of mlx-lm the server relies on: named in one adapter, checked against the installed release.

A release of mlx-lm that renames one of them must be refused at start-up with
a sentence that names it and the installed version, never found out by a
traceback at the first request.
"""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from mlx_server import mlx_lm_compat
from mlx_server.mlx_lm_compat import REQUIRED_ATTRIBUTES, Attribute, IncompatibleMlxLmError, check
from testbed.tokenizers import load_tokenizer

from .conftest import run_python

#: Every private attribute, by owner: what this table lists is what the adapter checks at start-up.
RELIED_ON = {
    ("BatchGenerator", "_generation_batch"),
    ("BatchGenerator", "_prompt_batch"),
    ("BatchGenerator", "_currently_processing"),
    ("BatchGenerator", "_unprocessed_sequences"),
    ("GenerationBatch", "_next_tokens"),
    ("GenerationBatch", "_next_logprobs"),
    ("GenerationBatch", "_num_tokens"),
    ("GenerationBatch", "_matchers"),
    ("GenerationBatch", "_token_context"),
    ("TokenizerWrapper", "_tokenizer"),
    ("tokenizer_utils", "_infer_tool_parser"),
}


def test_the_adapter_checks_exactly_the_attributes_the_server_relies_on() -> None:
    assert {(attribute.owner, attribute.name) for attribute in REQUIRED_ATTRIBUTES} == RELIED_ON


def test_the_installed_mlx_lm_has_every_one(tiny_llama: Any) -> None:
    tokenizer = load_tokenizer("qwen3")
    assert mlx_lm_compat.missing_attributes(tiny_llama, tokenizer) == []
    check(tiny_llama, tokenizer)


def test_the_installed_mlx_lm_is_in_the_pinned_range() -> None:
    """pyproject.toml and the adapter say the same range, and the installed release is in it."""
    from packaging.specifiers import SpecifierSet

    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert f'"mlx-lm{mlx_lm_compat.SUPPORTED_MLX_LM}"' in pyproject
    assert version("mlx-lm") in SpecifierSet(mlx_lm_compat.SUPPORTED_MLX_LM)


def test_a_missing_attribute_is_named_with_the_installed_version(
    tiny_llama: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    renamed = Attribute("GenerationBatch", "_renamed_in_a_later_release", "a test")
    monkeypatch.setattr(mlx_lm_compat, "REQUIRED_ATTRIBUTES", (*REQUIRED_ATTRIBUTES, renamed))
    with pytest.raises(IncompatibleMlxLmError) as refused:
        check(tiny_llama, load_tokenizer("qwen3"))
    message = str(refused.value)
    assert f"mlx-lm {version('mlx-lm')} lacks GenerationBatch._renamed_in_a_later_release" in message
    assert mlx_lm_compat.SUPPORTED_MLX_LM in message


@pytest.mark.e2e
def test_the_server_refuses_to_start_with_a_sentence() -> None:
    """At start-up, before the port opens: exit code 2 and one ERROR line, no traceback."""
    code = """
import logging, sys
from mlx_server import mlx_lm_compat
from mlx_server.settings import parse_settings
from mlx_server.startup import run
gone = mlx_lm_compat.Attribute("BatchGenerator", "_renamed_in_a_later_release", "a test")
mlx_lm_compat.REQUIRED_ATTRIBUTES = (*mlx_lm_compat.REQUIRED_ATTRIBUTES, gone)
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
print("exit", run(parse_settings([]), logging.getLogger("mlx")))
"""
    completed = run_python(code)
    assert "exit 2" in completed.stdout
    assert re.search(
        r"Cannot load the model: mlx-lm \S+ lacks BatchGenerator._renamed_in_a_later_release", completed.stdout
    )
    assert "Traceback" not in completed.stdout + completed.stderr
