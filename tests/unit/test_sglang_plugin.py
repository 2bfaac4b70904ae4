"""kvconnect's SGLang plugin against SGLang's real plugin loader, argument parser, enum and
``get_kv_class`` (imported for real; skipped when SGLang is not installed)."""

from __future__ import annotations

import importlib.metadata as md
import json

import pytest

pytest.importorskip("sglang", reason="SGLang is not installed")

from tests.sglang_stubs import import_sglang  # noqa: E402

MODS = import_sglang()


@pytest.fixture(scope="module")
def registered():
    from kvconnect.adapters.sglang import register

    register()
    return MODS


def _entry_point():
    return md.EntryPoint(
        name="kvconnect", value="kvconnect.adapters.sglang.plugin:register", group="sglang.srt.plugins"
    )


def test_sglang_plugin_loader_finds_and_loads_the_entry_point(monkeypatch):
    plugins = MODS["sglang.srt.plugins"]
    monkeypatch.setattr(
        plugins,
        "entry_points",
        lambda group: [_entry_point()] if group == plugins.GENERAL_PLUGINS_GROUP else [],
    )
    monkeypatch.delenv("SGLANG_PLUGINS", raising=False)
    from kvconnect.adapters.sglang.plugin import register

    loaded = plugins.load_plugins_by_group(plugins.GENERAL_PLUGINS_GROUP)
    assert loaded["kvconnect"][0] is register


def test_sglang_plugins_filter_can_leave_kvconnect_out(monkeypatch):
    plugins = MODS["sglang.srt.plugins"]
    monkeypatch.setattr(plugins, "entry_points", lambda group: [_entry_point()])
    monkeypatch.setenv("SGLANG_PLUGINS", "some_other_plugin")
    assert plugins.load_plugins_by_group(plugins.GENERAL_PLUGINS_GROUP) == {}


def test_installed_distribution_declares_the_entry_point():
    eps = [ep for ep in md.entry_points(group="sglang.srt.plugins") if ep.name == "kvconnect"]
    if not eps:
        pytest.skip("kvconnect's sglang.srt.plugins entry point is not in the installed metadata yet")
    assert eps[0].value == "kvconnect.adapters.sglang.plugin:register"


def test_real_argument_parser_accepts_the_kvconnect_transfer_backend(registered):
    args = registered["sglang.srt.server_args"].prepare_server_args(
        ["--model-path", "/nonexistent", "--disaggregation-mode", "prefill",
         "--disaggregation-transfer-backend", "kvconnect"]
    )
    assert args.disaggregation_transfer_backend == "kvconnect"


def test_real_argument_parser_still_refuses_unknown_backends(registered):
    with pytest.raises(SystemExit):
        registered["sglang.srt.server_args"].prepare_server_args(
            ["--model-path", "/x", "--disaggregation-transfer-backend", "kvconnect-typo"]
        )


def test_transfer_backend_enum_knows_kvconnect(registered):
    tb = registered["sglang.srt.disaggregation.utils"].TransferBackend
    assert tb("kvconnect") is tb.KVCONNECT and tb.KVCONNECT.value == "kvconnect"
    assert tb("nixl") is tb.NIXL  # the declared members are untouched


def test_get_kv_class_resolves_kvconnect_to_subclasses_of_sglang_common_classes(registered):
    u = registered["sglang.srt.disaggregation.utils"]
    c = registered["sglang.srt.disaggregation.common.conn"]
    from kvconnect.adapters.sglang import conn

    kb = u.TransferBackend("kvconnect")
    got = {t: u.get_kv_class(kb, t) for t in u.KVClassType}
    assert got[u.KVClassType.MANAGER] is conn.KVConnectKVManager
    assert got[u.KVClassType.SENDER] is conn.KVConnectKVSender
    assert got[u.KVClassType.RECEIVER] is conn.KVConnectKVReceiver
    assert got[u.KVClassType.BOOTSTRAP_SERVER] is conn.KVConnectKVBootstrapServer
    from sglang.srt.disaggregation.base.conn import KVArgs

    assert got[u.KVClassType.KVARGS] is KVArgs
    assert issubclass(conn.KVConnectKVManager, c.CommonKVManager)
    assert issubclass(conn.KVConnectKVSender, c.CommonKVSender)
    assert issubclass(conn.KVConnectKVReceiver, c.CommonKVReceiver)
    assert issubclass(conn.KVConnectKVBootstrapServer, c.CommonKVBootstrapServer)


def test_modules_that_imported_get_kv_class_see_the_hook(registered):
    import sglang.srt.managers.disagg_service as ds

    from kvconnect.adapters.sglang import conn

    u = registered["sglang.srt.disaggregation.utils"]
    assert (
        ds.get_kv_class(u.TransferBackend("kvconnect"), u.KVClassType.BOOTSTRAP_SERVER)
        is conn.KVConnectKVBootstrapServer
    )
    assert ds.rust_server_serves_kv_bootstrap(
        "kvconnect"
    )  # a Common bootstrap server: the Rust registry may stand in


def test_other_backends_pass_through_the_hook(registered):
    u = registered["sglang.srt.disaggregation.utils"]
    assert u.get_kv_class(u.TransferBackend.FAKE, u.KVClassType.MANAGER).__name__ == "FakeKVManager"


def test_register_twice_is_harmless(registered):
    from kvconnect.adapters.sglang import register

    register()
    choices = registered["sglang.srt.server_args"].DISAGG_TRANSFER_BACKEND_CHOICES
    assert choices.count("kvconnect") == 1


def test_config_env_is_validated_with_clear_errors(monkeypatch):
    from kvconnect.adapters.sglang.link import CONFIG_ENV, load_config
    from kvconnect.errors import ConfigError

    assert load_config("").transfer_timeout_s > 0
    assert load_config(json.dumps({"transfer_timeout_s": 3})).transfer_timeout_s == 3
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config("{nope")
    with pytest.raises(ConfigError, match="transfer_timeout"):
        load_config(json.dumps({"transfer_timeout": 3}))
    with pytest.raises(ConfigError, match="one P/D backend"):
        load_config(json.dumps({"backend": "cpu_offload", "cpu_bytes_to_use": 10}))
    monkeypatch.setenv(CONFIG_ENV, json.dumps({"poll_interval_s": 0.01}))
    assert load_config().poll_interval_s == 0.01
