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


def test_a_load_that_drops_a_block_fails_the_bench_after_the_timed_runs(monkeypatch):
    """A copier losing one block of a load is caught by the check after the timed runs (it is
    not one of the few blocks the timed loop samples), naming the block."""
    from kvconnect.backends.cpu_offload import worker as offload_worker

    real = offload_worker.copy_blocks

    def lossy(layers, kind, block_ids, slots, *a, **kw):
        if kind == "load" and len(block_ids) > 3:
            block_ids, slots = block_ids[:1] + block_ids[2:], slots[:1] + slots[2:]  # skips the 2nd block
        return real(layers, kind, block_ids, slots, *a, **kw)

    monkeypatch.setattr(offload_worker, "copy_blocks", lossy)
    with pytest.raises(RuntimeError, match=r"the verification load: 1 of \d+ blocks of layer 0 differ"):
        offload.main(["--quick", "--json", "--layers", "2", "--gb", "0.004", "--repeats", "1", "--block-sizes", "16",
                      "--lookup-stored", "1000", "--copy-threads", "1", "--device", "cpu"])
