"""Test-only fault hook for vLLM servers started by the e2e tests (put on their PYTHONPATH).

With ``KVC_TEST_FAIL_LOADS_FLAG=<path>`` and ``KVC_TEST_FAIL_LOADS_RANK=<r>`` in a server's
environment, kvconnect's NIXL worker on TP rank ``r`` reports every transfer that completes while
``<path>`` exists as failed (the agent's ``check_xfer_state`` answers ``"ERR"`` instead of
``"DONE"``); other ranks and other times are untouched. This is how a failed load on one rank of
a TP > 1 decode is produced on the real engine. Nothing here runs unless the variables are set.
"""

from __future__ import annotations

import os

_FLAG = os.environ.get("KVC_TEST_FAIL_LOADS_FLAG")
_RANK = int(os.environ.get("KVC_TEST_FAIL_LOADS_RANK", "-1"))


def _install() -> None:
    from kvconnect.backends import nixl as kn

    real_init = kn.NixlWorker.__init__

    def init(self, config, engine, agent_factory=None, config_factory=None):
        if engine.tp_rank == _RANK and agent_factory is None:
            agent_cls, default_conf = kn.load_nixl()

            def faulty_agent(*args, **kwargs):
                agent = agent_cls(*args, **kwargs)
                check = agent.check_xfer_state

                def check_xfer_state(handle):
                    state = check(handle)
                    return "ERR" if state == "DONE" and os.path.exists(_FLAG) else state

                agent.check_xfer_state = check_xfer_state
                return agent

            agent_factory, config_factory = faulty_agent, config_factory or default_conf
        real_init(self, config, engine, agent_factory, config_factory)

    kn.NixlWorker.__init__ = init


if _FLAG and _RANK >= 0:
    _install()
