"""worker/spec_ceiling.py: replaying an answer through the n-gram drafter, and the row-cost line."""
from __future__ import annotations

import pytest

from llmctl.worker.spec_ceiling import line, replay


def test_an_answer_that_copies_its_prompt_takes_fewer_steps_than_tokens():
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    steps, rows, kept = replay(prompt, [1, 2, 3, 4, 5, 6, 7, 8], 4)
    assert kept > 0 and steps + kept == 8 and steps < 8
    assert rows >= steps + kept


def test_an_answer_that_repeats_nothing_drafts_nothing():
    assert replay([1, 2, 3], [10, 11, 12, 13, 14], 8) == (5, 5, 0)


def test_the_row_cost_line_is_the_least_squares_fit():
    fixed, per = line([5.0 + 3.0 * n for n in range(1, 10)])
    assert fixed == pytest.approx(5.0) and per == pytest.approx(3.0)
