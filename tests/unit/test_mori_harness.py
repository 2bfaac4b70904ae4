"""The P/D harness (tests/unit/pd_harness.py) bound to the MoRI backend on the fake ``mori.io``
(tests/fakes/fake_mori.py). Holds no tests: the MoRI test modules import :class:`MoriEngine` and
``mori_engines`` (an ``engines`` fixture body) from here."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from kvconnect.backends.mori import MoriScheduler, MoriWorker
from kvconnect.config import MoriConfig
from tests.fakes import fake_mori
from tests.unit import pd_harness
from tests.unit.pd_harness import Engine


def _worker(cfg, info, agent_factory=None, config_factory=None):
    return MoriWorker(cfg, info, mori=agent_factory)


@contextlib.contextmanager
def _bound_to_mori():
    saved = pd_harness.NixlConfig, pd_harness.NixlScheduler, pd_harness.NixlWorker
    pd_harness.NixlConfig, pd_harness.NixlScheduler, pd_harness.NixlWorker = (
        MoriConfig,
        MoriScheduler,
        _worker,
    )
    try:
        yield
    finally:
        pd_harness.NixlConfig, pd_harness.NixlScheduler, pd_harness.NixlWorker = saved


@dataclass
class MoriEngine(Engine):
    """An engine (scheduler half + one MoRI worker per TP rank) on the fake mori by default."""

    def __post_init__(self) -> None:
        if self.agent_factory is None:
            self.agent_factory = fake_mori
        with _bound_to_mori():
            super().__post_init__()

    def transport(self, rank: int = 0):
        return self.workers[rank]._transport

    def agent(self, rank: int = 0):
        """The rank's ``IOEngine``."""
        return self.workers[rank]._transport.engine


def mori_engines():
    """Body of an ``engines`` fixture: yields a factory of :class:`MoriEngine`, shuts them down after."""
    fake_mori.reset()
    fake_mori.knobs.wait_hang_cap_s = 0.2  # an unbounded wait fails its test quickly
    made: list[MoriEngine] = []

    def make(*args, **kw) -> MoriEngine:
        e = MoriEngine(*args, **kw)
        made.append(e)
        return e

    yield make
    for e in made:
        e.shutdown()
    fake_mori.reset()
