"""What the chat core needs to know about one model, worked out once when it loads: its profile.

A model's chat template (tool support, the generation prompt), its tool-call
format, its special tokens (the markers grammars write as single tokens), its
end-of-sequence tokens, whether it writes gpt-oss's harmony channels, its
context length, its fill-in-the-middle markers, how it reads images (a
vision model's image marker and processor), its thinking controls (a
template switch, a reasoning level, markers a budget can close), and its default sampling
(what the server's models config says for it, then what its authors
recommend).  None of these change between requests, and working them out
takes template renders and vocabulary scans, so each model's chat service
holds one profile, built once; nothing is kept in module globals, and two
models in one process share nothing by accident.
"""

from __future__ import annotations

from typing import Any

from mlx_server.chat.call_formats import HARMONY, HERMES, ToolCallFormat, detect_tool_call_format, special_tokens
from mlx_server.chat.call_grammars import GrammarWriter
from mlx_server.chat.grammars import GrammarVerdicts
from mlx_server.chat.prompts import FIM_MARKERS, ChatTemplate
from mlx_server.chat.thinking import ThinkingControls
from mlx_server.mlx_lm_compat import hf_tokenizer
from mlx_server.vocabulary import ImageReader, RecommendedSampling, Sampling

__all__ = ["ModelProfile"]


class ModelProfile:
    """One model's facts for the chat core (see the module's docstring); built once, read by every request."""

    def __init__(
        self,
        tokenizer: Any,
        context_length: int,
        recommended: RecommendedSampling | None = None,
        configured: Sampling | None = None,
        images: ImageReader | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.template = ChatTemplate(tokenizer)
        self.special_tokens = special_tokens(tokenizer)
        self.eos_token_ids: tuple[int, ...] = tuple(sorted(tokenizer.eos_token_ids))
        self.template_call_format = detect_tool_call_format(tokenizer)
        self.harmony = self.template_call_format is HARMONY
        vocabulary = tokenizer.get_vocab()
        self.vocabulary_size = len(vocabulary)
        self.fim_markers = next((markers for markers in FIM_MARKERS if all(m in vocabulary for m in markers)), None)
        self.recommended = recommended or RecommendedSampling()
        self.configured = configured or Sampling()  # the server's models config for this model
        self.grammar_verdicts = GrammarVerdicts()
        self.images = images  # a vision model's way in for images (None: the model reads text only)
        closable = self.harmony or bool(getattr(tokenizer, "has_thinking", False))
        self.thinking = ThinkingControls.of(getattr(hf_tokenizer(tokenizer), "chat_template", None), closable)

    @property
    def call_format(self) -> ToolCallFormat:
        """How this model writes calls: its template's format when the template renders tools, else Hermes
        (the server then injects a Hermes tool block into the system prompt)."""
        return self.template_call_format if self.template.support.tools else HERMES

    def grammar_writer(self) -> GrammarWriter:
        """A writer for one grammar (it numbers its terminals), in this model's vocabulary."""
        return GrammarWriter(self.special_tokens)
