"""The MoRI backend on real MoRI-IO and a ROCm device: tensor registration and a loopback
transfer between two real engines in one process. Skipped without a GPU, without ROCm torch,
or without ``mori.io`` (built from https://github.com/ROCm/mori); runs unchanged where all exist
(an RDMA-capable NIC is needed for the RDMA backend)."""

from __future__ import annotations

import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu

NBYTES = 1 << 20


@pytest.fixture(scope="module")
def mori():
    if not torch.cuda.is_available() or getattr(torch.version, "hip", None) is None:
        pytest.skip("needs a ROCm GPU")
    return pytest.importorskip("mori.io")


def _wait(t, h, timeout: float = 10.0):
    from kvconnect.pd.transport import Status

    end = time.monotonic() + timeout
    while (st := t.poll(h)) is Status.BUSY and time.monotonic() < end:
        time.sleep(0.0005)
    return st


def test_register_torch_tensor_describes_the_device_memory(mori):
    eng = mori.IOEngine("kvc-gpu-reg", mori.IOEngineConfig("127.0.0.1", 0))
    eng.create_backend(
        mori.BackendType.RDMA, mori.RdmaBackendConfig(1, -1, 1, mori.PollCqMode.POLLING, False)
    )
    t = torch.zeros(NBYTES, dtype=torch.uint8, device="cuda:0")
    md = eng.register_torch_tensor(t)
    assert md.loc == mori.MemoryLocationType.GPU and md.device_id == 0
    assert md.data == t.data_ptr() and md.size == NBYTES
    assert mori.MemoryDesc.unpack(md.pack()) == md
    with pytest.raises(RuntimeError):
        eng.register_torch_tensor(torch.zeros(64, 64, device="cuda:0").t())  # not contiguous
    eng.deregister_memory(md)


@pytest.mark.parametrize("op", ["READ", "WRITE"])
def test_loopback_transfer_between_two_real_engines(mori, op):
    from kvconnect.backends.mori import MoriTransport
    from kvconnect.pd.transport import Op, Status

    gen = torch.Generator(device="cuda:0").manual_seed(0)
    bufs = {s: [torch.randint(0, 255, (NBYTES,), dtype=torch.uint8, device="cuda:0", generator=gen)
                for _ in range(2)] for s in "ab"}
    sides = {}
    for s in "ab":
        t = MoriTransport(f"kvc-gpu-{s}", mori, host="127.0.0.1", transfer_timeout_s=10.0)
        t.register([(b.data_ptr(), NBYTES) for b in bufs[s]], "cuda:0")
        sides[s] = t
    a, b = sides["a"], sides["b"]
    pb = a.add_peer(b.metadata(), [(x.data_ptr(), NBYTES) for x in bufs["b"]])
    b.add_peer(a.metadata(), [(x.data_ptr(), NBYTES) for x in bufs["a"]])
    rows = np.array([(r, i * 4096, 4096) for r in (0, 1) for i in range(0, 256, 2)], dtype=np.int64)
    idx = np.arange(len(rows))
    h = a.start(Op(op), pb, a.prepare(None, rows), idx, a.prepare(pb, rows), idx, notify=b"done")
    assert _wait(a, h) is Status.DONE
    torch.cuda.synchronize()
    src, dst = (bufs["b"], bufs["a"]) if op == "READ" else (bufs["a"], bufs["b"])
    for r in (0, 1):
        for i in range(0, 256, 2):
            assert torch.equal(dst[r][i * 4096:(i + 1) * 4096], src[r][i * 4096:(i + 1) * 4096])
        assert not torch.equal(dst[r][4096:8192], src[r][4096:8192])  # odd blocks untouched
    end = time.monotonic() + 5
    got = []
    while not got and time.monotonic() < end:
        got = b.notifications()
        time.sleep(0.001)
    assert got == [(a.agent_name, b"done")]
    a.close()
    b.close()
