"""The MultiConnector's hybrid-model rule (DESIGN.md, last row): a composition starts on a model
with several KV-cache groups when every child can serve it; a child that cannot is skipped
(``unsupported_model: skip``) or the start fails naming the child and why."""

from __future__ import annotations

import pytest

from kvconnect.api import EngineInfo
from kvconnect.config import parse_config
from kvconnect.errors import ConfigError, UnsupportedModelError
from kvconnect.multi import MultiScheduler, MultiWorker
from kvconnect.registry import create_scheduler
from tests.fakes.fake_connector import FakeScheduler, FakeWorker

pytestmark = pytest.mark.unit

HYBRID = EngineInfo("e", block_sizes=(32, 32), group_kinds=("sliding_window", "full_attention"),
                    sliding_windows=(64, 0), kv_bytes_per_block=2 * 4096, null_block_id=0)
MAMBA = EngineInfo("e", block_sizes=(32, 32), group_kinds=("MambaSpec", "full_attention"),
                   kv_bytes_per_block=2 * 4096, null_block_id=0)
ONE_GROUP = EngineInfo("e", block_sizes=(32,))

NIXL_CPU = [{"backend": "nixl"}, {"backend": "cpu_offload", "cpu_bytes_to_use": 1 << 20}]


def test_nixl_and_cpu_offload_start_on_a_sliding_window_and_full_attention_model():
    s = create_scheduler(parse_config({"backends": NIXL_CPU}), HYBRID)
    assert s.names == ["nixl", "cpu_offload"] and s.supports_hybrid
    s.shutdown()


def test_a_child_refusing_a_group_fails_the_start_naming_the_child_and_the_group():
    with pytest.raises(
        UnsupportedModelError, match=r"child 'cpu_offload' cannot serve.*group 0 uses 'MambaSpec'"
    ):
        create_scheduler(parse_config({"backends": NIXL_CPU}), MAMBA)


def test_skip_leaves_the_refusing_child_out_on_both_halves_alike():
    cfg = parse_config({"backends": NIXL_CPU, "unsupported_model": "skip"})
    s = create_scheduler(cfg, MAMBA)
    assert s.names == ["nixl"] and s.supports_hybrid
    w = MultiWorker([FakeWorker("nixl", hybrid=True), FakeWorker("cpu", hybrid=False)], MAMBA,
                    names=["nixl", "cpu_offload"], unsupported_model="skip")
    assert w.names == s.names
    s.shutdown()


def test_a_one_group_child_fails_the_start_on_a_hybrid_model_and_every_child_is_shut_down():
    a, b = FakeScheduler("a", hybrid=True), FakeScheduler("b", hybrid=False)
    with pytest.raises(
        UnsupportedModelError, match=r"child 'b' cannot serve .*supports_hybrid=False.*\"skip\""
    ):
        MultiScheduler([a, b], HYBRID, ["a", "b"])
    assert a.calls_to("shutdown") == [()] and b.calls_to("shutdown") == [()]


def test_skip_shuts_down_only_the_skipped_child():
    a, b = FakeScheduler("a", hybrid=True), FakeScheduler("b", hybrid=False)
    s = MultiScheduler([a, b], HYBRID, ["a", "b"], unsupported_model="skip")
    assert s.children == [a] and s.names == ["a"]
    assert b.calls_to("shutdown") == [()] and a.calls_to("shutdown") == []


def test_skip_still_fails_when_no_child_can_serve_the_model():
    with pytest.raises(UnsupportedModelError, match="no child can serve it"):
        MultiScheduler([FakeScheduler("a"), FakeScheduler("b")], HYBRID, ["a", "b"],
                                     unsupported_model="skip")


def test_one_group_children_compose_freely_on_a_one_group_model():
    s = MultiScheduler([FakeScheduler("a"), FakeScheduler("b")], ONE_GROUP, ["a", "b"])
    assert s.names == ["a", "b"] and not s.supports_hybrid


def test_unsupported_model_takes_fail_or_skip_only():
    with pytest.raises(ConfigError, match="unsupported_model"):
        parse_config({"backends": NIXL_CPU, "unsupported_model": "ignore"})
