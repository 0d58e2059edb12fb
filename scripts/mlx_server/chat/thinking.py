"""Thinking and effort: what a request asks, the server's default, and a model's own controls, resolved.

Clients say it in their dialect's words (Anthropic's ``thinking`` and
``output_config.effort``, the Responses API's ``reasoning.effort``, chat's
``reasoning_effort``); the dialects translate them into a ``ThinkingRequest``.
A model's controls are read from its chat template once: a switch that turns
thinking on or off (Qwen3's ``enable_thinking``, DeepSeek V3.1's ``thinking``),
a level (gpt-oss's ``reasoning_effort``), and whether it writes its thinking
where a grammar can close it (reasoning markers, harmony's analysis channel),
which is what a token budget needs.  ``resolve`` lays the request over the
server's default (``--thinking``, ``--thinking-budget``) and maps the result
onto those controls: template options (which change the rendered prompt, so
the prompt cache, keyed by tokens, stays exact) and a budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from jinja2 import Environment, TemplateSyntaxError, meta

from mlx_server.vocabulary import EFFORTS, Effort

__all__ = ["ThinkingControls", "ThinkingPlan", "ThinkingRequest", "resolve", "server_thinking"]

# Template variables that turn thinking on or off, and ones that name a reasoning level, as families spell them.
SWITCHES = ("enable_thinking", "thinking")
LEVELS = ("reasoning_effort",)
# A level model's words, and where each effort lands among them (gpt-oss: low, medium, high; it cannot stop).
LEVEL_FOR_EFFORT = {"none": "low", "minimal": "low", "low": "low", "medium": "medium", "high": "high",
                    "xhigh": "high", "max": "high"}  # fmt: skip
LEAST_EFFORT = ("none", "minimal")  # on a model that can only switch thinking on or off, these mean off


@dataclass(frozen=True)
class ThinkingRequest:
    """What is asked of a model's thinking; None: not said (Anthropic's ``adaptive``: the model decides).

    ``param`` names where the request said it, for messages.
    """

    enabled: bool | None = None
    budget_tokens: int | None = None
    effort: Effort | None = None
    param: str = field(default="thinking", compare=False)

    def over(self, fallback: ThinkingRequest) -> ThinkingRequest:
        """These settings where given, ``fallback``'s elsewhere (a request over the server's default)."""
        filled = {item.name: getattr(fallback, item.name) for item in fields(self)
                  if item.name != "param" and getattr(self, item.name) is None}  # fmt: skip
        return replace(self, **filled)

    def given(self) -> dict[str, Any]:
        return {key: value for key, value in (("enabled", self.enabled), ("budget_tokens", self.budget_tokens),
                                              ("effort", self.effort)) if value is not None}  # fmt: skip


def server_thinking(mode: str, budget: int | None) -> ThinkingRequest:
    """The server's default from ``--thinking`` (auto, on, off, or an effort) and ``--thinking-budget``."""
    if mode == "auto":
        return ThinkingRequest(budget_tokens=budget, param="--thinking")
    if mode in ("on", "off"):
        return ThinkingRequest(enabled=mode == "on", budget_tokens=budget, param="--thinking")
    effort = next((effort for effort in EFFORTS if effort == mode), None)
    if effort is None:
        raise ValueError(f"--thinking must be auto, on, off or one of {', '.join(EFFORTS)}, not {mode!r}")
    return ThinkingRequest(effort=effort, budget_tokens=budget, param="--thinking")


@dataclass(frozen=True)
class ThinkingControls:
    """A model's own controls for thinking, read from its chat template once (see the module's docstring)."""

    switch: str | None = None
    levels: str | None = None
    closable: bool = False  # it marks its thinking, so a grammar can end it when a budget is spent

    @classmethod
    def of(cls, chat_template: Any, closable: bool) -> ThinkingControls:
        """The controls ``chat_template`` (its source, or a dict of named templates) reads."""
        variables = _template_variables(chat_template)
        switch = next((name for name in SWITCHES if name in variables), None)
        levels = next((name for name in LEVELS if name in variables), None)
        return cls(switch, levels, closable)

    def describe(self) -> str:
        parts = [f"switch {self.switch}" if self.switch else "", f"levels {self.levels}" if self.levels else "",
                 "budgets" if self.closable else ""]  # fmt: skip
        return ", ".join(part for part in parts if part) or "none"


@dataclass(frozen=True)
class ThinkingPlan:
    """A request's thinking, resolved: options for the chat template, a budget, and what could not be honoured."""

    template_options: tuple[tuple[str, Any], ...] = ()
    budget: int | None = None
    ignored: tuple[str, ...] = ()  # settings the model has no control for

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.template_options)


def resolve(asked: ThinkingRequest, default: ThinkingRequest, controls: ThinkingControls) -> ThinkingPlan:
    """The request's settings over the server's default, on this model's controls."""
    setting = asked.over(default)
    options: list[tuple[str, Any]] = []
    ignored: list[str] = []
    off = setting.enabled is False or (setting.enabled is None and setting.effort in LEAST_EFFORT)
    if controls.switch is not None:
        if setting.enabled is not None or setting.effort is not None:
            options.append((controls.switch, not off))
    elif controls.levels is not None:
        if setting.effort is not None or setting.enabled is False:
            options.append((controls.levels, "low" if off else LEVEL_FOR_EFFORT[setting.effort or "medium"]))
        if setting.enabled is False:
            ignored.append("enabled")  # a level model cannot stop thinking: its lowest level instead
    elif setting.enabled is not None or setting.effort is not None:
        ignored.append("enabled" if setting.enabled is not None else "effort")
    budget = None
    if setting.budget_tokens is not None and not off:
        if controls.closable:
            budget = setting.budget_tokens
        else:
            ignored.append("budget_tokens")
    return ThinkingPlan(tuple(options), budget, tuple(ignored))


def _template_variables(chat_template: Any) -> set[str]:
    """The variables a chat template reads without setting them (jinja2's own analysis)."""
    sources = chat_template.values() if isinstance(chat_template, dict) else [chat_template]
    variables: set[str] = set()
    environment = Environment()
    for source in sources:
        if not isinstance(source, str):
            continue
        try:
            variables |= meta.find_undeclared_variables(environment.parse(source))
        except TemplateSyntaxError:
            continue
    return variables
