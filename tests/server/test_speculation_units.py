"""Prompt lookup's drafting and its adaptive draft size, as pure functions (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_server.engine.speculation import FIRST_DRAFT, MAX_DRAFT, Acceptance, PromptLookup
from mlx_server.settings import parse_settings


def draft(tokens: list[int], count: int = 4) -> list[int]:
    return PromptLookup().draft(np.array(tokens), count)


class TestPromptLookup:
    def test_copies_what_followed_the_latest_occurrence_of_the_final_ngram(self) -> None:
        assert draft([1, 2, 3, 9, 9, 1, 2, 3, 7, 7, 5, 1, 2, 3]) == [7, 7, 5, 1]

    def test_a_longer_match_wins_over_a_more_recent_shorter_one(self) -> None:
        # (5, 1, 2) recurs once, early; (1, 2) alone recurs later, followed by something else.
        assert draft([5, 1, 2, 8, 8, 0, 1, 2, 6, 6, 5, 1, 2]) == [8, 8, 0, 1]

    def test_nothing_to_copy_drafts_nothing(self) -> None:
        assert draft([1, 2, 3, 4, 5, 6]) == []
        assert draft([7]) == []

    def test_a_draft_never_runs_past_the_context(self) -> None:
        assert draft([4, 5, 6, 4, 5], count=10) == [6, 4, 5]


class TestAcceptance:
    def test_a_fully_kept_draft_doubles_the_next_up_to_the_cap(self) -> None:
        acceptance = Acceptance()
        for _ in range(6):
            acceptance.record(acceptance.draft_size(), acceptance.size)
        assert acceptance.size == MAX_DRAFT

    def test_a_partly_kept_draft_shrinks_to_what_was_kept_and_one(self) -> None:
        acceptance = Acceptance()
        acceptance.record(FIRST_DRAFT, 2)
        assert acceptance.draft_size() == 3

    def test_repeated_misses_pause_drafting_longer_each_time(self) -> None:
        acceptance = Acceptance()
        pauses = []
        for _ in range(3):
            acceptance.record(acceptance.size, 0)
            acceptance.record(acceptance.size, 0)
            pauses.append(acceptance.wait)
            while acceptance.draft_size() == 0:
                pass
        assert pauses == [1, 2, 4]
        acceptance.record(acceptance.size, 1)
        assert acceptance.backoff == 1

    def test_counts_what_was_drafted_and_kept(self) -> None:
        acceptance = Acceptance()
        acceptance.record(6, 6)
        acceptance.record(12, 3)
        assert (acceptance.drafted, acceptance.accepted) == (18, 9)


class TestSetting:
    def test_prompt_lookup_is_the_default_and_off_turns_it_off(self) -> None:
        assert parse_settings([], {}).speculative == "prompt-lookup"
        assert parse_settings(["--speculative", "off"], {}).speculative == "off"

    def test_an_unknown_mode_is_refused(self) -> None:
        with pytest.raises(SystemExit):
            parse_settings(["--speculative", "draft-model"], {})
