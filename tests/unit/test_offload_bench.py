"""The offload benchmark runs small and reports the figures it promises."""

from __future__ import annotations

import json

import pytest

from kvconnect.bench import offload, report
from kvconnect.errors import BenchmarkError

pytestmark = pytest.mark.unit


def _quick(capsys, *extra: str) -> dict:
    rc = offload.main(["--quick", "--json", "--layers", "2", "--gb", "0.004", "--repeats", "1",
                       "--lookup-stored", "1000", "--lookup-prefix-blocks", "8", "--device", "cpu", *extra])
    assert rc == 0
    return json.loads(capsys.readouterr().out)


def test_quick_bench_measures_the_engines_cpu_layouts_by_default_beside_a_plain_copy(capsys):
    out = _quick(capsys, "--copy-threads", "1", "2")
    for key in ("store_gbps", "load_gbps", "memcpy_gbps"):
        assert out[key] > 0
    assert out["layouts"] == ["vllm_cpu", "flash_nhd"]
    assert {(r["layout"], r["block_size"], r["threads"]) for r in out["rows"]} == {
        (lay, bs, th) for lay in ("vllm_cpu", "flash_nhd") for bs in (16, 32) for th in (1, 2)}
    for r in out["rows"]:
        for k in ("store_ratio", "load_ratio", "gather_ratio", "scatter_ratio"):
            assert r[k] > 0
        # vLLM's CPU cache moves one run per block and layer; flash NHD keeps K and V apart.
        assert r["runs_per_block_layer"] == (1 if r["layout"] == "vllm_cpu" else 2)
    assert out["lookup"][0]["stored_blocks"] == 1000
    table = "\n".join(report.md_offload(out))
    assert "| vllm_cpu | 16 | 2 |" in table and "bare gather GB/s" in table


def test_other_layouts_are_measured_on_request(capsys):
    out = _quick(capsys, "--copy-threads", "1", "--layouts", "mla", "flash_hnd", "--block-sizes", "16")
    assert [(r["layout"], r["runs_per_block_layer"]) for r in out["rows"]] == [("mla", 1), ("flash_hnd", 2)]


def test_report_update_replaces_only_the_sections_that_were_run():
    old = (
        "# kvconnect benchmarks\n\nMade by x.\n\n## CPU offload bandwidth\n\nold table\n\n"
        "## P/D transfer (NIXL)\n\nkept\n"
    )
    new = "# kvconnect benchmarks\n\nMade by y.\n\n## CPU offload bandwidth\n\nCommand: `c`\n\nnew table\n"
    got = report.update_sections(old, new, ["CPU offload bandwidth"], "Refreshed by y.")
    assert got == ("# kvconnect benchmarks\n\nMade by x.\n\n## CPU offload bandwidth\n\nRefreshed by y.\n\n"
                   "Command: `c`\n\nnew table\n\n## P/D transfer (NIXL)\n\nkept\n")


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
    with pytest.raises(
        BenchmarkError, match=r"1 of \d+ blocks of layer\.0\.k differ after a store and a load"
    ):
        offload.main(
            [
                "--quick",
                "--json",
                "--layers",
                "2",
                "--gb",
                "0.004",
                "--repeats",
                "1",
                "--block-sizes",
                "16",
                "--lookup-stored",
                "1000",
                "--copy-threads",
                "1",
                "--device",
                "cpu",
            ]
        )
