from __future__ import annotations

import pytest

from tests.service import Service


@pytest.fixture
def make_service():
    """Factory of real services; every one started is stopped at teardown."""
    made: list[Service] = []

    def make(**sections) -> Service:
        svc = Service(**sections)
        made.append(svc)
        return svc

    yield make
    problems = []
    for svc in made:
        try:
            svc.stop()
        except AssertionError as exc:      # stop them all, then report
            problems.append(str(exc))
    assert not problems, "\n".join(problems)
