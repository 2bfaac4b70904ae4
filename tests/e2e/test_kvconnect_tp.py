"""kvconnect P/D with tensor parallelism on real vLLM (CPU) servers through vllm-router, on the
hybrid model (three KV-cache groups, 2 KV heads: one per rank at TP 2).

TP 2 -> 1, 2 -> 2 and 1 -> 2 share one module deployment: the prefill instance sits on core 0
(TP 2: both ranks bound there, ``VLLM_CPU_OMP_THREADS_BIND="0|0"``), the decode on core 1; each
test starts only the instance its pair lacks (REFERENCE.md: a TP-2 instance spread over both
cores next to another instance starves it). vLLM aggregates kvconnect's per-rank finished and
failed sets itself (``KVOutputAggregator``); the last test makes one rank of a TP-2 decode fail
its load (``tests/e2e/faults/sitecustomize.py``) and checks the request fails once, at once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.e2e import kvc

if kvc.deps_missing():
    pytest.skip(f"not installed: {', '.join(kvc.deps_missing())}", allow_module_level=True)

from kvconnect.testing import servers as S  # noqa: E402
from kvconnect.testing import tiny_models as T  # noqa: E402

pytestmark = pytest.mark.e2e

FAULTS = Path(__file__).parent / "faults"


class Deployment:
    """At most one prefill and one decode instance up at a time, started on demand."""

    def __init__(self, model: Path, wd: Path, group: kvc.Group) -> None:
        self.model, self.wd, self.group = model, wd, group
        self.up: dict[str, S.ServerProcess] = {}
        self.router: S.ServerProcess | None = None
        self.pair: tuple[int, int] | None = None
        self.fail_flag = wd / "fail-rank1-loads"
        self.ready_s: dict[str, float] = {}

    def _server(self, role: str, tp: int) -> S.ServerProcess:
        core = "0" if role == "prefill" else "1"
        cpus = "|".join([core] * tp)
        args = ["--tensor-parallel-size", str(tp)] if tp > 1 else []
        env = {}
        policy = None
        if role == "decode":
            policy = "fail"
            env = {"KVC_TEST_FAIL_LOADS_FLAG": str(self.fail_flag), "KVC_TEST_FAIL_LOADS_RANK": "1",
                   "PYTHONPATH": os.pathsep.join([str(FAULTS), os.environ.get("PYTHONPATH", "")])}
        # TP rank r listens on side_channel_port + r: keep a gap between instances.
        kv = kvc.kvconnect(kvc.nixl(S.free_port()), policy=policy)
        return kvc.server(self.model, self.wd, f"{role}-tp{tp}", cpus, kv, env=env, args=args)

    def use(
        self, prefill_tp: int, decode_tp: int
    ) -> tuple[S.ServerProcess, S.ServerProcess, S.ServerProcess]:
        if self.pair != (prefill_tp, decode_tp):
            if self.router is not None:
                self.router.stop()
                self.router = None
            new = []
            for role, tp in (("prefill", prefill_tp), ("decode", decode_tp)):
                cur = self.up.get(role)
                if cur is not None and cur.name != f"{role}-tp{tp}":
                    cur.stop()
                    cur = None
                if cur is None:
                    cur = self.up[role] = self._server(role, tp)
                    new.append(cur)
            t0 = time.monotonic()
            self.group.start(*new)
            for s in new:
                self.ready_s[s.name] = time.monotonic() - t0
            self.router = self.group.router(self.up["prefill"], self.up["decode"], self.wd,
                                            f"router-{prefill_tp}to{decode_tp}")
            self.pair = (prefill_tp, decode_tp)
        assert self.router is not None
        return self.up["prefill"], self.up["decode"], self.router


@pytest.fixture(scope="module")
def tp(tmp_path_factory):
    model = T.cached("hybrid")
    wd = tmp_path_factory.mktemp("kvc_tp")
    with kvc.Group() as g:
        if "hybrid-small" not in kvc.BASELINES:
            single = kvc.server(model, wd, "single", "0-1")
            g.start(single)
            kvc.BASELINES["hybrid-small"] = kvc.request_set(single.url, small=True)
            kvc.BASELINES["hybrid-extra"] = {
                "long": S.completion(single.url, kvc.prompt_ids(7001, 180)).token_ids
            }
            single.stop()
        yield Deployment(model, wd, g), kvc.BASELINES["hybrid-small"], kvc.BASELINES["hybrid-extra"]


def _pd(tp, request, prefill_tp: int, decode_tp: int) -> None:
    dep, want, extra = tp
    p, d, router = dep.use(prefill_tp, decode_tp)
    loads0 = kvc.kvc_stat_before(d.url, "nixl.loads_done")
    got = kvc.request_set(router.url, small=True)
    got["long"] = S.completion(router.url, kvc.prompt_ids(7001, 180)).token_ids
    kvc.assert_same(
        got, {**want, **extra}, f"kvconnect hybrid P/D TP {prefill_tp} -> {decode_tp} vs single", p, d
    )
    time.sleep(1.5)
    loads = kvc.kvc_stat(d.url, "nixl.loads_done") - loads0
    # vLLM sums the per-rank stats: every request loads on every decode rank.
    assert loads >= len(got) * decode_tp, (
        f"{loads} rank-loads for {len(got)} requests at decode TP {decode_tp}"
    )
    started = ", ".join(f"{k} ready in {v:.0f} s" for k, v in dep.ready_s.items())
    kvc.note(request, f"TP {prefill_tp}->{decode_tp}: {len(got)}/{len(got)} outputs == single; "
                      f"rank-loads {loads:.0f} ({started})")


@pytest.mark.sweep("hybrid-pull-tp2to1")
def test_pd_prefill_tp2_to_decode_tp1_equals_single_instance(tp, request):
    _pd(tp, request, 2, 1)


@pytest.mark.sweep("hybrid-pull-tp2to2")
def test_pd_prefill_tp2_to_decode_tp2_equals_single_instance(tp, request):
    _pd(tp, request, 2, 2)


@pytest.mark.sweep("hybrid-pull-tp1to2")
def test_pd_prefill_tp1_to_decode_tp2_equals_single_instance(tp, request):
    _pd(tp, request, 1, 2)


@pytest.mark.sweep("hybrid-tp2-decode-rank-fail")
def test_a_failed_load_on_one_decode_rank_fails_the_request_once(tp, request):
    dep, want, _ = tp
    p, d, _ = dep.use(1, 2)
    prompt = kvc.prompt_ids(7002, 120)
    failed0 = kvc.kvc_stat_before(d.url, "nixl.loads_failed")
    done0 = kvc.kvc_stat_before(d.url, "nixl.loads_done")
    params = kvc.prefill_direct(p.url, prompt)
    dep.fail_flag.touch()
    t0 = time.perf_counter()
    err = None
    try:
        g = kvc.decode_direct(d.url, prompt, params, timeout=90)
    except S.ServerError as e:
        err = str(e)
    finally:
        dep.fail_flag.unlink()
    took = time.perf_counter() - t0
    if err is None:
        assert g.finish_reason not in ("length", "stop"), (
            f"decode completed normally ({g.finish_reason}) although rank 1's load failed\n{d.log_tail(30)}")
        err = f"finish_reason={g.finish_reason}"
    assert took < 30, f"the failed load took {took:.0f} s to report"
    time.sleep(1.5)
    failed = kvc.kvc_stat(d.url, "nixl.loads_failed") - failed0
    done = kvc.kvc_stat(d.url, "nixl.loads_done") - done0
    assert (failed, done) == (1, 1), f"rank-loads failed {failed}, done {done}: rank 1 fails, rank 0 succeeds"
    # The decode serves on: a P/D request after the fault loads on both ranks and matches.
    ok = S.completion(dep.router.url, kvc.PROMPTS["ragged113"])
    assert ok.token_ids == want["cmpl/ragged113"]
    kvc.note(request, f"rank 1 of 2 failed its load, rank 0 loaded: request error after {took:.2f} s "
                      f"({err[:90]}); "
                      f"loads_failed +{failed:.0f}; next P/D request == single")
