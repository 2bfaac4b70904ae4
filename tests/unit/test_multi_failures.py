"""A child that raises: the others and their requests go on; the raising child's loads fail
through the engine's load-failure path; nothing hangs."""

import pytest

from kvconnect.api import StepView
from kvconnect.errors import ConfigError
from tests.fakes.fake_connector import FakePair, MultiRig, ScriptedFailure

pytestmark = pytest.mark.unit


def test_child_raising_in_lookup_counts_as_a_miss():
    rig = MultiRig(FakePair("a", default_hit=32, raise_in={"get_num_new_matched_tokens"}),
                   FakePair("b", default_hit=16))
    assert rig.admit("r", [[1, 2]]) == (16, True)
    assert rig["b"].scheduler.calls_to("update_state_after_alloc") == [("r", [[1, 2]], 16)]
    assert rig["a"].scheduler.calls_to("update_state_after_alloc") == [("r", [[1, 2]], 0)]


def test_owner_raising_at_alloc_fails_its_load_not_the_other_childs():
    rig = MultiRig(FakePair("a", hits={"r1": 32}), FakePair("b", hits={"r2": 16}))
    rig.admit("r2", [[5, 6]])
    rig["a"].scheduler.raise_in.add("update_state_after_alloc")
    rig.admit("r1", [[1, 2, 3]])  # a owns r1 and cannot take it
    res = rig.step()
    assert res.finished_recving == {"r1"} and res.failed_recving == {"r1"}
    assert res.invalid_block_ids == {1, 2}  # tokens [0, 32) of r1
    rig["b"].worker.queue_recved("r2")
    res = rig.step()
    assert res.finished_recving == {"r2"} and res.failed_recving == set()


def test_worker_child_raising_in_start_load_fails_only_its_loads():
    rig = MultiRig(FakePair("a", hits={"r1": 16}), FakePair("b", hits={"r2": 16}))
    rig.admit("r1", [[1]])
    rig.admit("r2", [[2]])
    rig["a"].worker.raise_in.add("start_load_kv")
    rig["b"].worker.queue_recved("r2")
    res = rig.step()
    assert res.finished_recving == {"r1", "r2"}
    assert res.failed_recving == {"r1"}
    assert res.invalid_block_ids == {1}
    # a sat out the rest of the step; b did not
    assert [c[0] for c in rig["a"].worker.calls].count("wait_for_layer_load") == 0
    assert [c[0] for c in rig["b"].worker.calls].count("wait_for_layer_load") == 2


def test_late_report_of_a_load_already_failed_is_dropped():
    rig = MultiRig(FakePair("a", hits={"r1": 16}), FakePair("b"))
    rig.admit("r1", [[1]])
    rig["a"].worker.raise_in.add("wait_for_layer_load")
    assert rig.step().failed_recving == {"r1"}
    rig["a"].worker.raise_in.clear()
    rig["a"].worker.queue_recved("r1")
    assert rig.step().finished_recving == set()  # the engine hears of r1 once


def test_child_failing_get_transfer_results_does_not_hide_the_others():
    rig = MultiRig(FakePair("a", defer={"r"}), FakePair("b", hits={"q": 16}))
    rig.finish("r")
    rig.admit("q", [[3]])
    rig.step()
    rig["a"].worker.raise_in.add("get_transfer_results")
    rig["b"].worker.queue_recved("q")
    assert rig.step().finished_recving == {"q"}


def test_child_failing_request_finished_does_not_stop_the_others():
    rig = MultiRig(FakePair("a", raise_in={"request_finished"}, defer={"r"}),
                   FakePair("b", defer={"r"}, params={"r": {"k": 1}}))
    assert rig.finish("r") == (True, {"k": 1})
    rig.step()
    rig["b"].worker.queue_sent("r")
    assert rig.step().finished_sending == {"r"}  # a is not waited for: it never deferred


def test_child_failing_to_build_metadata_sits_the_step_out():
    rig = MultiRig(FakePair("a", hits={"r": 16}), FakePair("b"))
    rig.admit("r", [[4]])
    rig["a"].scheduler.raise_in.add("build_step_metadata")
    res = rig.step()
    assert res.failed_recving == {"r"} and res.invalid_block_ids == {4}
    assert rig["a"].worker.bound == [] and len(rig["b"].worker.bound) == 1
    assert "start_load_kv" not in [c[0] for c in rig["a"].worker.calls]


def test_config_errors_from_a_child_are_not_swallowed():
    rig = MultiRig(FakePair("a"), FakePair("b"))

    def boom(*a):
        raise ConfigError("bad option x")

    rig["a"].scheduler.get_num_new_matched_tokens = boom
    with pytest.raises(ConfigError, match="bad option x"):
        rig.admit("r", [[1]])


def test_register_failure_names_the_child_and_raises(caplog):
    rig = MultiRig(FakePair("a"), FakePair("b"))
    rig["b"].worker.raise_in.add("register_kv_caches")
    with pytest.raises(ScriptedFailure):
        rig.worker.register_kv_caches({})
    assert "child b failed to register" in caplog.text


def test_every_child_is_shut_down_before_the_first_error_is_raised():
    rig = MultiRig(FakePair("a", raise_in={"shutdown"}), FakePair("b"))
    with pytest.raises(ScriptedFailure):
        rig.scheduler.shutdown()
    assert rig["b"].scheduler.calls_to("shutdown") == [()]


def test_child_errors_are_counted_in_stats():
    rig = MultiRig(FakePair("a", default_hit=16, raise_in={"get_num_new_matched_tokens"}), FakePair("b"))
    rig.admit("r", [[1]])
    assert rig.scheduler.get_stats()["a"]["multi_child_errors"] == 1
    assert "multi_child_errors" not in rig.scheduler.get_stats()["b"]


def test_step_view_is_unchanged_for_healthy_children_when_one_fails():
    rig = MultiRig(FakePair("a", raise_in={"build_step_metadata"}), FakePair("b"))
    step = StepView(finished_request_ids={"z"})
    rig.step(step)
    assert rig["b"].worker.bound[0].finished == ("z",)
