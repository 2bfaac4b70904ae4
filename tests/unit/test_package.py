import json
import subprocess
import sys

import pytest

from kvconnect.cli import main

pytestmark = pytest.mark.unit

HEAVY = ("torch", "zmq", "vllm", "sglang", "nixl", "nixl_cu12", "mori", "numpy")


def test_importing_kvconnect_pulls_in_no_heavy_module():
    code = (
        "import sys, json, kvconnect, kvconnect.config, kvconnect.api, kvconnect.errors;"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_cli_validates_a_config(capsys):
    assert main(["config", '{"backend": "nixl"}']) == 0
    assert "valid: nixl" in capsys.readouterr().out
    assert main(["config", '{"backend": "nixl", "mdoe": 1}']) == 2
    assert "did you mean 'mode'" in capsys.readouterr().err


def test_cli_prints_every_default(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    for key in ("cpu_bytes_to_use", "lease_timeout_s", "transfer_timeout_s", "eviction_policy"):
        assert key in out


def test_cli_selfcheck_passes(capsys):
    assert main(["selfcheck"]) == 0
    assert "FAIL" not in capsys.readouterr().out


def test_unknown_benchmark_is_refused(capsys):
    assert main(["bench", "nope"]) == 2


#: The public API for code that embeds kvconnect. Changing it is a decision: update this list too.
PUBLIC_API = {
    "__version__",
    "SchedulerConnector",
    "WorkerConnector",
    "EngineInfo",
    "RequestView",
    "ScheduledRequest",
    "StepView",
    "TransferResults",
    "parse_config",
    "KVConnectConfig",
    "NixlConfig",
    "MoriConfig",
    "CpuOffloadConfig",
    "create_scheduler",
    "create_worker",
    "KVConnectError",
    "ConfigError",
    "UnsupportedModelError",
    "LayoutError",
    "WireError",
    "HandshakeError",
    "PeerRefusedError",
    "CompatibilityError",
    "TransferError",
    "BackendUnavailableError",
}


def test_public_api_is_exactly_the_locked_list_and_every_name_resolves():
    import kvconnect

    assert set(kvconnect.__all__) == PUBLIC_API
    for name in PUBLIC_API:
        assert getattr(kvconnect, name) is not None, name
    assert issubclass(kvconnect.ConfigError, kvconnect.KVConnectError)
    with pytest.raises(AttributeError, match="no attribute 'KVLayout'"):
        kvconnect.KVLayout  # noqa: B018 - internal names are not re-exported


def test_the_public_api_stays_light_to_import():
    names = ", ".join(sorted(PUBLIC_API - {"__version__", "create_scheduler", "create_worker"}))
    code = (f"import sys, json; from kvconnect import {names};"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_cli_reports_a_kvconnect_error_by_name_without_a_traceback(monkeypatch, capsys):
    from kvconnect import cli
    from kvconnect.errors import BenchmarkError

    def fails(args):
        raise BenchmarkError("bytes differ after a round trip")

    monkeypatch.setattr(cli, "_cmd_demo", fails)
    assert main(["demo"]) == 1
    assert capsys.readouterr().err == "kvconnect demo: BenchmarkError: bytes differ after a round trip\n"


def test_every_connector_method_documents_its_own_contract():
    import inspect

    from kvconnect.api import SchedulerConnector, WorkerConnector

    for cls in (SchedulerConnector, WorkerConnector):
        for name, fn in vars(cls).items():
            if inspect.isfunction(fn) and not name.startswith("_"):
                assert (fn.__doc__ or "").strip(), f"{cls.__name__}.{name} has no docstring of its own"
