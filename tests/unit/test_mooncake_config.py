"""Bad mooncake configs are ConfigErrors naming the field, found at start and within the
connect deadline; the backend appears in ``kvconnect config`` and composes in a MultiConnector."""

from __future__ import annotations

import time

import pytest

from kvconnect.api import EngineInfo
from kvconnect.backends.mooncake import store as mstore
from kvconnect.cli import main as cli_main
from kvconnect.config import MooncakeConfig, parse_config
from kvconnect.errors import ConfigError
from kvconnect.testing.ports import free_port
from tests.fakes import fake_mooncake
from tests.unit.mooncake_harness import config


def _connect(cfg: MooncakeConfig):
    return mstore.connect(cfg, fake_mooncake.FakeMooncakeDistributedStore)


@pytest.mark.parametrize(
    "entry, field",
    [
        ({"master_server_address": "127.0.0.1"}, "master_server_address"),
        ({"master_server_address": "h:0"}, "master_server_address"),
        ({"metadata_server": "zookeeper://x"}, "metadata_server"),
        ({"global_segment_size": -1}, "global_segment_size"),
        ({"local_buffer_size": -5}, "local_buffer_size"),
        ({"load_timeout_s": 0}, "load_timeout_s"),
        ({"lookup_timeout_s": -1}, "lookup_timeout_s"),
        ({"batch_objects": 0}, "batch_objects"),
        ({"replica_num": 0}, "replica_num"),
    ],
)
def test_invalid_values_name_their_field(entry, field):
    raw = {"backend": "mooncake", "master_server_address": "127.0.0.1:50051", **entry}
    with pytest.raises(ConfigError, match=field):
        parse_config(raw)


def test_a_missing_master_address_is_refused():
    with pytest.raises(ConfigError, match="master_server_address"):
        parse_config({"backend": "mooncake"})


def test_an_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="metadata_server"):
        parse_config({"backend": "mooncake", "master_server_address": "127.0.0.1:1", "metadata_sever": "x"})


def test_sizes_written_as_floats_are_accepted():
    cfg = parse_config({"backend": "mooncake", "master_server_address": "127.0.0.1:1",
                        "global_segment_size": 1e9})
    assert cfg.backends[0].global_segment_size == 1_000_000_000


def test_unreachable_master_is_a_config_error_within_the_deadline():
    cfg = MooncakeConfig(master_server_address=f"127.0.0.1:{free_port()}", connect_timeout_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="master_server_address"):
        _connect(cfg)
    assert time.monotonic() - t0 < 2.0


def test_unreachable_http_metadata_server_is_a_config_error(master):
    cfg = config(master, metadata_server=f"http://127.0.0.1:{free_port()}/metadata")
    with pytest.raises(ConfigError, match="metadata_server"):
        _connect(cfg)


def test_a_metadata_mode_other_than_the_stores_is_a_config_error(master):
    fake_mooncake.cluster.put_code = fake_mooncake.TRANSFER_FAIL  # what the real store answers
    with pytest.raises(ConfigError, match="metadata_server"):
        _connect(config(master))


def test_a_store_without_memory_is_a_config_error_naming_global_segment_size(master):
    fake_mooncake.cluster.full = True
    with pytest.raises(ConfigError, match="global_segment_size"):
        _connect(config(master))


def test_a_setup_that_fails_is_a_config_error(master):
    fake_mooncake.cluster.down = True
    with pytest.raises(ConfigError, match="set-up failed"):
        _connect(config(master))


def test_a_setup_that_hangs_is_cut_at_connect_timeout(master):
    class Hangs(fake_mooncake.FakeMooncakeDistributedStore):
        def setup(self, *a, **k):
            time.sleep(30)
            return 0

    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="connect_timeout_s"):
        mstore.connect(config(master, connect_timeout_s=0.5), Hangs)
    assert time.monotonic() - t0 < 2.0


def test_the_probe_object_is_removed(master):
    _connect(config(master))
    assert not fake_mooncake.cluster.objects


def test_kvconnect_config_lists_the_mooncake_options(capsys):
    assert cli_main(["config"]) == 0
    out = capsys.readouterr().out
    assert "[mooncake]" in out and "master_server_address = '<required>'" in out


def test_mooncake_composes_after_the_host_tier_in_a_multiconnector(master, monkeypatch):
    from kvconnect.registry import create_scheduler

    monkeypatch.setattr(mstore, "load_store_class", lambda: fake_mooncake.FakeMooncakeDistributedStore)
    cfg = parse_config({"backends": [
        {"backend": "cpu_offload", "cpu_bytes_to_use": 1 << 20},
        {"backend": "mooncake", "master_server_address": master.address},
    ]})
    sched = create_scheduler(cfg, EngineInfo("e", block_sizes=(32,), kv_bytes_per_block=4096))
    try:
        assert type(sched).__name__ == "MultiScheduler"
        assert cfg.names == ["cpu_offload", "mooncake"]
    finally:
        sched.shutdown()
