"""MultiConnector rules on the scheduler side: load delegation, allocation notices, store
broadcast, step metadata, transfer params, handshake, stats, hybrid support, composition checks."""

import pytest

from kvconnect.api import EngineInfo, ScheduledRequest, StepView
from kvconnect.config import parse_config
from kvconnect.errors import ConfigError, KVConnectError, WireError
from kvconnect.multi import MultiScheduler, MultiStepMetadata, MultiWorker, child_names
from kvconnect.multi.scheduler import external_blocks
from tests.fakes.fake_connector import (
    ConfiguredFakeScheduler,
    ConfiguredFakeWorker,
    FakePair,
    FakeScheduler,
    FakeStepMeta,
    FakeWorker,
    MultiRig,
    request,
)

pytestmark = pytest.mark.unit

ENGINE = EngineInfo(engine_id="e0", block_sizes=(16,))


def sched(*children, names=None):
    return MultiScheduler(children, ENGINE, names or [c.name for c in children])


# -- hybrid support ---------------------------------------------------------------------------


def test_hybrid_supported_when_every_child_supports_it():
    s = sched(FakeScheduler("a", hybrid=True), FakeScheduler("b", hybrid=True))
    w = MultiWorker([FakeWorker("a", hybrid=True), FakeWorker("b", hybrid=True)], ENGINE, ["a", "b"])
    assert s.supports_hybrid and w.supports_hybrid


def test_hybrid_unsupported_when_one_child_lacks_it():
    s = sched(FakeScheduler("a", hybrid=True), FakeScheduler("b", hybrid=False))
    w = MultiWorker([FakeWorker("a", hybrid=True), FakeWorker("b")], ENGINE, ["a", "b"])
    assert not s.supports_hybrid and not w.supports_hybrid


# -- load lookup --------------------------------------------------------------------------------


def test_first_child_with_a_hit_answers():
    a, b, c = FakeScheduler("a"), FakeScheduler("b", default_hit=32), FakeScheduler("c", default_hit=64)
    assert sched(a, b, c).get_num_new_matched_tokens(request("r"), 0) == (32, True)


def test_children_after_the_first_hit_are_not_asked():
    a, b, c = FakeScheduler("a"), FakeScheduler("b", default_hit=32), FakeScheduler("c", default_hit=None)
    n, _ = sched(a, b, c).get_num_new_matched_tokens(request("r"), 0)
    assert n == 32  # c's "ask again later" cannot stall a load b can serve now
    assert c.calls_to("get_num_new_matched_tokens") == []
    assert a.calls_to("get_num_new_matched_tokens") == [("r", 0)]


def test_ask_again_later_before_any_hit_makes_the_answer_none():
    a, b = FakeScheduler("a", default_hit=None), FakeScheduler("b", default_hit=32)
    assert sched(a, b).get_num_new_matched_tokens(request("r"), 0) == (None, False)


def test_ask_again_later_from_a_later_child_without_earlier_hit_is_none():
    a, b = FakeScheduler("a", default_hit=0), FakeScheduler("b", default_hit=None)
    assert sched(a, b).get_num_new_matched_tokens(request("r"), 0) == (None, False)


def test_no_hit_anywhere_is_zero():
    assert sched(FakeScheduler("a"), FakeScheduler("b")).get_num_new_matched_tokens(request("r"), 16) == (
        0,
        False,
    )


def test_owner_async_flag_is_returned():
    a, b = FakeScheduler("a"), FakeScheduler("b", default_hit=16, is_async=False)
    assert sched(a, b).get_num_new_matched_tokens(request("r"), 0) == (16, False)


# -- allocation notice --------------------------------------------------------------------------


def test_owner_gets_the_external_count_others_zero():
    a, b, c = FakeScheduler("a"), FakeScheduler("b", default_hit=32), FakeScheduler("c")
    rig_s = sched(a, b, c)
    req = request("r")
    n, _ = rig_s.get_num_new_matched_tokens(req, 16)
    rig_s.update_state_after_alloc(req, [[1, 2, 3]], n)
    assert a.calls_to("update_state_after_alloc") == [("r", [[1, 2, 3]], 0)]
    assert b.calls_to("update_state_after_alloc") == [("r", [[1, 2, 3]], 32)]
    assert c.calls_to("update_state_after_alloc") == [("r", [[1, 2, 3]], 0)]


def test_owner_follows_the_latest_lookup():
    a, b = FakeScheduler("a", default_hit=32), FakeScheduler("b", default_hit=16)
    s = sched(a, b)
    req = request("r")
    s.get_num_new_matched_tokens(req, 0)  # engine could not allocate; asks again later
    a.default_hit = 0
    n, _ = s.get_num_new_matched_tokens(req, 0)
    s.update_state_after_alloc(req, [[5]], n)
    assert a.calls_to("update_state_after_alloc") == [("r", [[5]], 0)]
    assert b.calls_to("update_state_after_alloc") == [("r", [[5]], 16)]


def test_zero_external_tokens_gives_everyone_zero():
    a, b = FakeScheduler("a", default_hit=32), FakeScheduler("b")
    s = sched(a, b)
    req = request("r")
    s.get_num_new_matched_tokens(req, 0)
    s.update_state_after_alloc(req, [[5]], 0)
    assert [c[2] for c in a.calls_to("update_state_after_alloc")] == [0]
    assert [c[2] for c in b.calls_to("update_state_after_alloc")] == [0]


def test_external_tokens_without_a_lookup_are_refused():
    s = sched(FakeScheduler("a"), FakeScheduler("b"))
    with pytest.raises(KVConnectError, match="no child offered"):
        s.update_state_after_alloc(request("r"), [[1]], 16)


def test_external_blocks_cover_only_the_loaded_tokens():
    # tokens [16, 48) with 16-token blocks: blocks 1 and 2 of the request; per group.
    assert external_blocks([[10, 11, 12, 13], [20, 21, 22, 23]], (16, 16), 16, 32) == (11, 12, 21, 22)
    assert external_blocks([[10, 11, 12]], (16,), 0, 20) == (10, 11)
    assert external_blocks([[10, 11, 12]], (16,), 0, 0) == ()


# -- store broadcast / step metadata ------------------------------------------------------------


def test_every_child_sees_the_same_step():
    a, b = FakeScheduler("a"), FakeScheduler("b")
    step = StepView(
        scheduled=[ScheduledRequest("r", [[1, 2]], 0, 32, is_new=True)], finished_request_ids={"q"}
    )
    sched(a, b).build_step_metadata(step)
    assert a.calls_to("build_step_metadata") == [(step,)]
    assert b.calls_to("build_step_metadata") == [(step,)]


def test_every_child_is_told_a_request_finished():
    a, b, c = FakeScheduler("a"), FakeScheduler("b"), FakeScheduler("c")
    sched(a, b, c).request_finished(request("r"), [[1, 2, 3]])
    for child in (a, b, c):
        assert child.calls_to("request_finished") == [("r", [[1, 2, 3]])]


def test_step_metadata_has_one_entry_per_child_in_order():
    meta = sched(FakeScheduler("a"), FakeScheduler("b")).build_step_metadata(StepView())
    assert isinstance(meta, MultiStepMetadata)
    assert [m.child for m in meta.children] == ["a", "b"]


def test_each_worker_child_binds_its_own_metadata():
    rig = MultiRig(FakePair("a"), FakePair("b"))
    rig.step(StepView(scheduled=[ScheduledRequest("r", [[1]], 0, 16, is_new=True)]))
    assert [m.child for m in rig["a"].worker.bound] == ["a"]
    assert [m.child for m in rig["b"].worker.bound] == ["b"]
    assert rig["b"].worker.bound[0] == FakeStepMeta(child="b", step=1, scheduled=("r",))


def test_worker_refuses_metadata_for_another_composition():
    w = MultiWorker([FakeWorker("a"), FakeWorker("b")], ENGINE, ["a", "b"])
    with pytest.raises(WireError, match="configs differ"):
        w.bind_step_metadata(MultiStepMetadata(children=(None,)))
    with pytest.raises(WireError, match="MultiStepMetadata"):
        w.bind_step_metadata(("x", "y"))


def test_save_and_load_calls_reach_every_worker_child():
    rig = MultiRig(FakePair("a"), FakePair("b"))
    rig.step(layers=("l0",))
    for name in ("a", "b"):
        methods = [c[0] for c in rig[name].worker.calls]
        assert methods == ["bind_step_metadata", "start_load_kv", "wait_for_layer_load", "save_kv_layer",
                           "wait_for_save", "get_transfer_results", "clear_step_metadata"]


# -- request finished: params and deferral ------------------------------------------------------


def test_transfer_params_are_merged():
    a = FakeScheduler("a", params={"r": {"do_remote_decode": False, "remote_engine_id": "p0"}})
    b = FakeScheduler("b", params={"r": {"offload_hit": 3}})
    c = FakeScheduler("c")
    delay, params = sched(a, b, c).request_finished(request("r"), [[1]])
    assert params == {"do_remote_decode": False, "remote_engine_id": "p0", "offload_hit": 3}
    assert delay is False


def test_no_params_from_any_child_is_none():
    assert sched(FakeScheduler("a"), FakeScheduler("b")).request_finished(request("r"), [[1]]) == (
        False,
        None,
    )


def test_transfer_param_key_clash_names_both_children_and_the_key():
    a = FakeScheduler("a", params={"r": {"remote_host": "h1", "x": 1}})
    b = FakeScheduler("b", params={"r": {"remote_host": "h2"}})
    with pytest.raises(ConfigError) as e:
        sched(a, b, names=["nixl", "cpu_offload"]).request_finished(request("r"), [[1]])
    msg = str(e.value)
    assert "'remote_host'" in msg and "nixl" in msg and "cpu_offload" in msg and "'x'" not in msg


def test_delay_free_when_any_child_defers():
    s = sched(FakeScheduler("a"), FakeScheduler("b", defer={"r"}))
    assert s.request_finished(request("r"), [[1]])[0] is True
    assert s.request_finished(request("q"), [[2]])[0] is False


def test_step_metadata_carries_which_children_deferred():
    s = sched(FakeScheduler("a", defer={"r"}), FakeScheduler("b"), FakeScheduler("c", defer={"r"}))
    s.request_finished(request("r"), [[1]])
    assert s.build_step_metadata(StepView()).deferred == {"r": (0, 2)}
    assert s.build_step_metadata(StepView()).deferred == {}  # handed over once


# -- handshake and stats ------------------------------------------------------------------------


def test_handshake_metadata_is_keyed_by_child():
    w = MultiWorker(
        [FakeWorker("nixl", handshake={"port": 1}), FakeWorker("cpu"), FakeWorker("x", handshake=b"m")],
        ENGINE, ["nixl", "cpu", "x"])
    assert w.get_handshake_metadata() == {"nixl": {"port": 1}, "x": b"m"}


def test_handshake_metadata_is_none_when_no_child_has_any():
    w = MultiWorker([FakeWorker("a"), FakeWorker("b")], ENGINE, ["a", "b"])
    assert w.get_handshake_metadata() is None


def test_handshake_metadata_is_routed_back_to_each_child():
    a, b, c = FakeScheduler("a"), FakeScheduler("b"), FakeScheduler("c")
    s = sched(a, b, c)
    s.set_handshake_metadata({0: {"a": "a0", "b": "b0"}, 1: {"a": "a1", "b": "b1"}})
    assert a.calls_to("set_handshake_metadata") == [({0: "a0", 1: "a1"},)]
    assert b.calls_to("set_handshake_metadata") == [({0: "b0", 1: "b1"},)]
    assert c.calls_to("set_handshake_metadata") == []


def test_handshake_metadata_of_the_wrong_shape_is_refused():
    with pytest.raises(WireError, match="rank 0"):
        sched(FakeScheduler("a"), FakeScheduler("b")).set_handshake_metadata({0: b"blob"})


def test_scheduler_stats_are_keyed_by_child():
    s = sched(FakeScheduler("a", stats={"hits": 2}), FakeScheduler("b", stats={"hits": 5}))
    assert s.get_stats() == {"a": {"hits": 2}, "b": {"hits": 5}}


def test_worker_stats_are_keyed_by_child_and_routed_back():
    rig = MultiRig(FakePair("a"), FakePair("b"))
    rig["a"].worker.queue_stats({"bytes": 10})
    rig["b"].worker.queue_stats({"bytes": 20})
    res = rig.step()
    assert res.stats == {"a": {"bytes": 10}, "b": {"bytes": 20}}
    (out_a,) = rig["a"].scheduler.calls_to("update_worker_output")
    assert out_a[0].stats == {"bytes": 10}


# -- composition and names ----------------------------------------------------------------------


def test_repeated_backend_names_are_numbered():
    assert child_names(["nixl", "cpu_offload", "cpu_offload"]) == ["nixl", "cpu_offload#1", "cpu_offload#2"]
    assert child_names(["nixl", "cpu_offload"]) == ["nixl", "cpu_offload"]


def test_empty_composition_is_refused():
    with pytest.raises(ConfigError, match="at least one"):
        MultiScheduler([], ENGINE, [])
    with pytest.raises(ConfigError, match="at least one"):
        MultiWorker([], ENGINE, [])


def test_two_pd_children_are_refused():
    with pytest.raises(ConfigError, match="P/D"):
        sched(FakeScheduler("a"), FakeScheduler("b"), names=["nixl", "mori"])
    with pytest.raises(ConfigError, match="P/D"):
        MultiWorker([FakeWorker(), FakeWorker()], ENGINE, ["nixl#1", "nixl#2"])


def test_names_must_match_children_and_be_unique():
    with pytest.raises(ConfigError, match="2 children but 1 names"):
        sched(FakeScheduler("a"), FakeScheduler("b"), names=["a"])
    with pytest.raises(ConfigError, match="unique"):
        sched(FakeScheduler("a"), FakeScheduler("b"), names=["a", "a"])


def test_a_composition_where_no_child_loads_is_fine():
    s = sched(FakeScheduler("a"), FakeScheduler("b"))
    assert s.get_num_new_matched_tokens(request("r"), 0) == (0, False)


def test_registry_builds_the_composition_in_config_order(monkeypatch):
    from kvconnect import registry

    fake = ("tests.fakes.fake_connector", "ConfiguredFakeScheduler", "ConfiguredFakeWorker")
    monkeypatch.setitem(registry.BACKENDS, "nixl", fake)
    monkeypatch.setitem(registry.BACKENDS, "cpu_offload", fake)
    cfg = parse_config({"backends": [
        {"backend": "nixl"},
        {"backend": "cpu_offload", "cpu_bytes_to_use": 1 << 20},
        {"backend": "cpu_offload", "cpu_bytes_to_use": 2 << 20},
    ]})
    s = registry.create_scheduler(cfg, ENGINE)
    w = registry.create_worker(cfg, ENGINE)
    assert isinstance(s, MultiScheduler) and isinstance(w, MultiWorker)
    assert s.names == w.names == ["nixl", "cpu_offload#1", "cpu_offload#2"]
    assert all(isinstance(c, ConfiguredFakeScheduler) for c in s.children)
    assert all(isinstance(c, ConfiguredFakeWorker) for c in w.children)
    assert [c.config for c in s.children] == list(cfg.backends)


def test_constructor_takes_built_children_with_names():
    s = MultiScheduler([FakeScheduler("x"), FakeScheduler("y")], ENGINE, names=["p", "q"])
    assert s.names == ["p", "q"]
    assert MultiWorker([FakeWorker(), FakeWorker()], ENGINE).names == ["FakeWorker#1", "FakeWorker#2"]


def test_a_child_that_fails_to_start_shuts_down_those_already_built(monkeypatch):
    from kvconnect import registry

    built = []

    class Ok(ConfiguredFakeScheduler):
        def __init__(self, cfg, engine):
            super().__init__(cfg, engine)
            built.append(self)

    def create(cfg, engine):
        if cfg.cpu_bytes_to_use == 2:
            raise RuntimeError("no memory")
        return Ok(cfg, engine)

    monkeypatch.setattr(registry, "create_backend_scheduler", create)
    cfg = parse_config({"backends": [{"backend": "cpu_offload", "cpu_bytes_to_use": 1},
                                     {"backend": "cpu_offload", "cpu_bytes_to_use": 2}]})
    with pytest.raises(RuntimeError, match="no memory"):
        registry.create_scheduler(cfg, ENGINE)
    assert [c.calls_to("shutdown") for c in built] == [[()]]


def test_step_metadata_survives_pickling():
    import pickle

    s = sched(FakeScheduler("a", defer={"r"}, default_hit=16), FakeScheduler("b"))
    s.get_num_new_matched_tokens(request("q"), 0)
    s.update_state_after_alloc(request("q"), [[3]], 16)
    s.request_finished(request("r"), [[1]])
    meta = s.build_step_metadata(StepView())
    assert pickle.loads(pickle.dumps(meta)) == meta
    assert meta.loads["q"].blocks == (3,) and meta.deferred == {"r": (0,)}


# -- load rule "longest" --------------------------------------------------------------------------


def test_longest_rule_gives_the_load_to_the_longest_hit():
    a, b = FakeScheduler("a", default_hit=64), FakeScheduler("b", default_hit=1280)
    s = MultiScheduler([a, b], ENGINE, ["a", "b"], load_rule="longest")
    assert s.get_num_new_matched_tokens(request("r"), 0) == (1280, True)
    s.update_state_after_alloc(request("r"), ([1, 2],), 1280)
    assert a.calls_to("update_state_after_alloc")[-1][-1] == 0
    assert b.calls_to("update_state_after_alloc")[-1][-1] == 1280


def test_longest_rule_keeps_the_earlier_child_on_a_tie():
    a, b = FakeScheduler("a", default_hit=64, is_async=False), FakeScheduler("b", default_hit=64)
    s = MultiScheduler([a, b], ENGINE, ["a", "b"], load_rule="longest")
    assert s.get_num_new_matched_tokens(request("r"), 0) == (64, False)


def test_longest_rule_waits_for_a_child_that_asks_again_later():
    a, b = FakeScheduler("a", default_hit=64), FakeScheduler("b", default_hit=None)
    s = MultiScheduler([a, b], ENGINE, ["a", "b"], load_rule="longest")
    assert s.get_num_new_matched_tokens(request("r"), 0) == (None, False)


def test_first_rule_is_the_default_and_load_rule_parses_from_the_config():
    assert parse_config({"backends": [{"backend": "nixl"}]}).load_rule == "first"
    cfg = parse_config({"load_rule": "longest", "backends": [
        {"backend": "cpu_offload", "cpu_bytes_to_use": 1 << 20}, {"backend": "nixl"}]})
    assert cfg.load_rule == "longest"
    with pytest.raises(ConfigError, match="load_rule"):
        parse_config({"load_rule": "biggest", "backends": [{"backend": "nixl"}]})


def test_an_unknown_backend_name_is_a_config_error_naming_it_with_its_cause():
    from kvconnect import registry

    with pytest.raises(ConfigError, match="unknown backend 'nope'") as e:
        registry.scheduler_class("nope")
    assert isinstance(e.value.__cause__, KeyError)
    with pytest.raises(ConfigError, match="backend 'nope' declares no stats"):
        registry.stat_names("nope")
