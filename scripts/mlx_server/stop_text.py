"""Stop sequences over streamed text: what may be sent, and which sequence matched.

Pure text (mlx-lm's ``TextStateMachine`` does the matching): the engine cuts a
completion at a stop string with it, and the scripted engine of the fast tests
does the same without an engine of its own.
"""

from __future__ import annotations

from mlx_lm.generate import TextStateMachine

__all__ = ["StopText"]


class StopText:
    """Stop sequences over streamed text: what may be sent, and which sequence matched (mlx-lm's TextStateMachine).

    Text that could be the start of a stop sequence is held back; the
    sequence itself and anything after it are never sent.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._state = TextStateMachine({"normal": [(stop, None) for stop in stops]}).make_state()
        self._seen = ""
        self._sent = 0
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        """The text that is safe to send; sets ``matched`` when a stop sequence completes."""
        if self.matched is not None:
            return ""
        self._seen += text
        self._state, safe, state_name = TextStateMachine.step(self._state, text)
        safe = str(safe)
        self._sent += len(safe)
        if state_name is None:
            candidates = [stop for stop in self._stops if self._seen.startswith(stop, self._sent)]
            self.matched = min(candidates, key=len) if candidates else self._stops[0]
        return safe

    def flush(self) -> str:
        """Whatever was held back, at the end of the output (no stop sequence followed it)."""
        if self.matched is not None:
            return ""
        self._state, held, _ = TextStateMachine.flush(self._state)
        return str(held)
