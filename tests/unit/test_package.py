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
