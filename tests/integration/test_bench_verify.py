"""``kvconnect bench transfer`` checks every byte it moved after its timed runs (real NIXL, a
producer process and a consumer here), and fails loudly when a transfer leaves a block wrong."""

from __future__ import annotations

import pytest

from kvconnect.bench import transfer

pytest.importorskip("nixl_cu12._api", reason="real NIXL (nixl-cu12) is not installed")
pytestmark = pytest.mark.integration

TINY = ["--device", "cpu", "--layers", "2", "--blocks", "24", "--request-blocks", "4", "--batch", "2",
        "--iters", "1", "--head-dim", "64"]


def test_transfer_bench_reports_the_bytes_it_verified(capsys):
    assert transfer.main([*TINY, "--json"]) == 0
    import json

    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    block_bytes = 2 * 16 * 8 * 64 * 2
    # 2 merge settings x 2 block-id layouts x 3 checks x (2 layers x 8 blocks)
    assert res["verified_bytes"] == 2 * 2 * 3 * 2 * 8 * block_bytes


def test_a_transfer_that_skips_a_block_fails_the_bench_naming_it(monkeypatch, capsys):
    """The consumer's transport drops the last descriptor of every kvconnect transfer: the
    timed figures would look fine; the check after them fails the run."""
    from kvconnect.backends.nixl import NixlTransport

    real = NixlTransport.start

    def lossy(self, op, peer, local, local_idx, remote, remote_idx, notify=None):
        return real(self, op, peer, local, local_idx[:-1], remote, remote_idx[:-1], notify)

    monkeypatch.setattr(NixlTransport, "start", lossy)
    assert transfer.main(TINY) == 1
    err = capsys.readouterr().err
    assert "transfer benchmark failed" in err and "a kvconnect batch left wrong bytes" in err
    assert "producer block" in err and "consumer block" in err
