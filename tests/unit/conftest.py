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


@pytest.fixture
def master():
    """A fake Mooncake master (tests/unit/mooncake_harness.py) with a fresh cluster, cleared after."""
    from tests.fakes import fake_mooncake
    from tests.unit.mooncake_harness import FakeMaster

    fake_mooncake.cluster.reset()
    m = FakeMaster()
    yield m
    m.close()
    fake_mooncake.cluster.reset()
