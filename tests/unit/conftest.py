"""Fixtures shared by the unit tests of the P/D core."""

from __future__ import annotations

import pytest


@pytest.fixture
def engines():
    """Make P/D test engines (tests/unit/pd_harness.py) for one test; every one is shut down and
    the fake NIXL registry cleared afterwards."""
    from tests.fakes import fake_nixl
    from tests.unit.pd_harness import Engine

    made: list[Engine] = []

    def make(*args, **kw) -> Engine:
        e = Engine(*args, **kw)
        made.append(e)
        return e

    yield make
    for e in made:
        e.shutdown()
    fake_nixl.registry.reset()
