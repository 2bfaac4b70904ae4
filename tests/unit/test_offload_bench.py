"""The offload benchmark runs small and reports the figures it promises."""

from __future__ import annotations

import json

import pytest

from kvconnect.bench import offload

pytestmark = pytest.mark.unit


def test_quick_bench_prints_one_json_object_with_bandwidths(capsys):
    rc = offload.main(["--quick", "--json", "--layers", "2", "--gb", "0.004", "--repeats", "1",
                       "--lookup-stored", "1000", "--lookup-prefix-blocks", "8", "--copy-threads", "1", "2", "--device", "cpu"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("store_gbps", "load_gbps", "memcpy_gbps"):
        assert out[key] > 0
    assert {(r["block_size"], r["threads"]) for r in out["rows"]} == {(16, 1), (32, 1), (16, 2), (32, 2)}
    for r in out["rows"]:
        assert 0 < r["store_ratio"] and 0 < r["load_ratio"]
    assert out["lookup"][0]["stored_blocks"] == 1000
