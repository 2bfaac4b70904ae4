"""Per-child completion counting: sends over the children that deferred, receives from the owner,
failures unioned; end to end through scheduler -> metadata -> worker -> scheduler, and across TP."""

import pytest

from kvconnect.aggregator import FinishedAggregator
from kvconnect.api import EngineInfo, StepView
from kvconnect.multi import CompletionTracker, LoadNote, MultiScheduler, MultiWorker
from tests.fakes.fake_connector import FakePair, FakeScheduler, FakeWorker, MultiRig

pytestmark = pytest.mark.unit


def rig3(**kw):
    return MultiRig(FakePair("a", **kw.get("a", {})), FakePair("b", **kw.get("b", {})),
                    FakePair("c", **kw.get("c", {})))


# -- sends ----------------------------------------------------------------------------------------


def test_send_reported_only_after_every_deferring_child_finished():
    rig = rig3(a={"defer": {"r"}}, c={"defer": {"r"}})
    assert rig.finish("r")[0] is True
    rig.step(StepView(finished_request_ids={"r"}))
    rig["a"].worker.queue_sent("r")
    assert "r" not in rig.step().finished_sending
    rig["c"].worker.queue_sent("r")
    assert rig.step().finished_sending == {"r"}


def test_report_from_a_child_that_did_not_defer_does_not_count():
    rig = rig3(a={"defer": {"r"}})
    rig.finish("r")
    rig.step()
    rig["b"].worker.queue_sent("r")
    assert rig.step().finished_sending == set()
    rig["a"].worker.queue_sent("r")
    assert rig.step().finished_sending == {"r"}


def test_send_is_reported_once():
    rig = rig3(a={"defer": {"r"}})
    rig.finish("r")
    rig.step()
    rig["a"].worker.queue_sent("r")
    assert rig.step().finished_sending == {"r"}
    rig["a"].worker.queue_sent("r")
    assert rig.step().finished_sending == set()


def test_report_arriving_before_the_deferral_record_is_credited():
    t = CompletionTracker(["a", "b"])
    t.on_child_results(0, _res(sent={"r"}))
    assert t.drain().finished_sending == set()  # never passed through unknown
    t.on_bind({"r": (0, 1)}, {})
    t.on_child_results(1, _res(sent={"r"}))
    assert t.drain().finished_sending == {"r"}


def test_all_early_reports_release_the_request_at_bind():
    t = CompletionTracker(["a", "b"])
    t.on_child_results(0, _res(sent={"r"}))
    t.on_child_results(1, _res(sent={"r"}))
    t.on_bind({"r": (0, 1)}, {})
    assert t.drain().finished_sending == {"r"}


def test_report_for_a_request_nobody_deferred_is_dropped_after_its_ttl(caplog):
    t = CompletionTracker(["a", "b"], early_report_ttl_steps=2)
    t.on_child_results(1, _res(sent={"stray"}))
    for _ in range(4):
        t.on_bind({}, {})
    assert t.pending()["early_sends"] == 0
    assert "stray" in caplog.text and "no child deferred" in caplog.text
    assert t.drain().finished_sending == set()


def test_a_failed_send_of_one_child_is_reported_failed_once_all_finished():
    rig = rig3(a={"defer": {"r"}}, b={"defer": {"r"}})
    rig.finish("r")
    rig.step()
    rig["a"].worker.queue_sent("r", failed=True)
    res = rig.step()
    assert res.finished_sending == set() and res.failed_sending == set()
    rig["b"].worker.queue_sent("r")
    res = rig.step()
    assert res.finished_sending == {"r"} and res.failed_sending == {"r"}


def test_failed_send_from_a_child_that_did_not_defer_is_ignored():
    rig = rig3(a={"defer": {"r"}})
    rig.finish("r")
    rig.step()
    rig["b"].worker.queue_sent("r", failed=True)
    rig["a"].worker.queue_sent("r")
    res = rig.step()
    assert res.finished_sending == {"r"} and res.failed_sending == set()


def test_early_failed_report_keeps_its_failure():
    t = CompletionTracker(["a", "b"])
    t.on_child_results(0, _res(sent={"r"}, send_failed={"r"}))
    t.on_bind({"r": (0, 1)}, {})
    t.on_child_results(1, _res(sent={"r"}))
    out = t.drain()
    assert out.finished_sending == {"r"} and out.failed_sending == {"r"}


def test_failed_send_is_routed_to_every_deferring_child_only():
    rig = rig3(a={"defer": {"r"}}, b={"defer": {"r"}})
    rig.finish("r")
    rig.step()
    rig["a"].worker.queue_sent("r", failed=True)
    rig["b"].worker.queue_sent("r")
    rig.step()
    got = {n: set().union(*(o[0].failed_sending for o in rig[n].scheduler.calls_to("update_worker_output")))
           for n in "abc"}
    assert got == {"a": {"r"}, "b": {"r"}, "c": set()}


def test_scheduler_tells_each_deferring_child_its_request_was_sent():
    rig = rig3(a={"defer": {"r"}}, b={"defer": {"r"}})
    rig.finish("r")
    rig.step()
    rig["a"].worker.queue_sent("r")
    rig["b"].worker.queue_sent("r")
    rig.step()
    for name, expect in (("a", {"r"}), ("b", {"r"}), ("c", set())):
        sent = set().union(
            *(o[0].finished_sending for o in rig[name].scheduler.calls_to("update_worker_output"))
        )
        assert sent == expect, name


# -- receives -------------------------------------------------------------------------------------


def test_recv_reported_when_the_owner_reports_it():
    rig = rig3(b={"default_hit": 32})
    assert rig.admit("r", [[1, 2, 3]]) == (32, True)
    assert rig.last_meta is None
    rig.step()
    assert rig.last_meta.loads["r"].child == 1
    rig["b"].worker.queue_recved("r")
    assert rig.step().finished_recving == {"r"}


def test_recv_report_from_a_non_owner_is_ignored():
    rig = rig3(b={"default_hit": 32})
    rig.admit("r", [[1, 2, 3]])
    rig.step()
    rig["c"].worker.queue_recved("r")
    rig["a"].worker.queue_recved("r", failed=True, invalid=[2])
    res = rig.step()
    assert res.finished_recving == set() and res.failed_recving == set()
    rig["b"].worker.queue_recved("r")
    assert rig.step().finished_recving == {"r"}


def test_recv_not_noted_as_an_async_load_is_passed_through():
    rig = rig3()
    rig["a"].worker.queue_recved("x")
    assert rig.step().finished_recving == {"x"}


def test_scheduler_routes_a_finished_load_to_its_owner_only():
    rig = rig3(b={"default_hit": 32})
    rig.admit("r", [[1, 2, 3]])
    rig.step()
    rig["b"].worker.queue_recved("r")
    rig.step()
    got = {n: set().union(*(o[0].finished_recving for o in rig[n].scheduler.calls_to("update_worker_output")))
           for n in "abc"}
    assert got == {"a": set(), "b": {"r"}, "c": set()}


def test_failed_receives_and_invalid_blocks_are_unioned():
    rig = MultiRig(FakePair("a", hits={"r1": 16}), FakePair("b", hits={"r2": 16}))
    rig.admit("r1", [[1]])
    rig.admit("r2", [[2]])
    rig.step()
    rig["a"].worker.queue_recved("r1", failed=True, invalid=[1])
    rig["b"].worker.queue_recved("r2", failed=True, invalid=[2])
    res = rig.step()
    assert res.finished_recving == {"r1", "r2"}
    assert res.failed_recving == {"r1", "r2"}
    assert res.invalid_block_ids == {1, 2}


def test_invalid_blocks_of_a_sync_load_are_reported():
    rig = MultiRig(FakePair("a"), FakePair("b", default_hit=16, is_async=False))
    rig.admit("r", [[7, 8]])
    rig.step()
    assert rig.last_meta.loads["r"] == LoadNote(child=1, is_async=False, blocks=(7,))
    rig["b"].worker.queue_recved(invalid=[7])
    assert rig.step().invalid_block_ids == {7}


# -- across TP ranks ------------------------------------------------------------------------------


def test_send_done_only_when_every_deferring_child_on_every_rank_finished():
    engine = EngineInfo(engine_id="e0", tp_size=2)
    scheds = [FakeScheduler("a", defer={"r"}), FakeScheduler("b", defer={"r"})]
    s = MultiScheduler(scheds, engine, ["a", "b"])
    ranks = [[FakeWorker("a"), FakeWorker("b")] for _ in range(2)]
    workers = [MultiWorker(ch, engine, ["a", "b"]) for ch in ranks]
    agg = FinishedAggregator(world_size=2)
    from tests.fakes.fake_connector import request

    s.request_finished(request("r"), [[1]])

    def step():
        meta = s.build_step_metadata(StepView())
        outs = []
        for w in workers:
            w.bind_step_metadata(meta)
            outs.append(w.get_transfer_results(set()))
            w.clear_step_metadata()
        res = agg.aggregate(outs)
        s.update_worker_output(res)
        return res.finished_sending

    assert step() == set()
    ranks[0][0].queue_sent("r")
    ranks[0][1].queue_sent("r")
    ranks[1][0].queue_sent("r")
    assert step() == set()  # rank 1's child b still reading
    ranks[1][1].queue_sent("r")
    assert step() == {"r"}


def _res(sent=(), recved=(), failed=(), invalid=(), send_failed=()):
    from kvconnect.api import TransferResults

    return TransferResults(finished_sending=set(sent), finished_recving=set(recved),
                           failed_recving=set(failed), invalid_block_ids=set(invalid),
                           failed_sending=set(send_failed))
