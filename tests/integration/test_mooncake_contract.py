"""The same cases on FakeMooncakeDistributedStore and on the real store (a real mooncake_master and
memory holder on loopback), so the fake the unit tests use keeps the real return conventions.
Run under the heavy-job lock: it starts a master."""

from __future__ import annotations

import inspect
import re
import uuid

import numpy as np
import pytest

from tests.fakes import fake_mooncake

mooncake_store_mod = pytest.importorskip("mooncake.store", reason="pip install 'kvconnect[mooncake]'")


@pytest.fixture(scope="module")
def real_store(tmp_path_factory):
    from kvconnect.testing.mooncake import mooncake_store

    with mooncake_store(tmp_path_factory.mktemp("mooncake"), segment_bytes=64 << 20) as st:
        yield st


def _client(kind: str, real_store) -> object:
    if kind == "fake":
        fake_mooncake.cluster.reset()
        s = fake_mooncake.FakeMooncakeDistributedStore()
        master, md = "127.0.0.1:1", "P2PHANDSHAKE"
    else:
        s = mooncake_store_mod.MooncakeDistributedStore()
        master, md = real_store.master_address, real_store.metadata_server
    assert s.setup("127.0.0.1", md, 0, 0, "tcp", "", master) == 0
    return s


@pytest.fixture(params=["fake", "real"])
def client(request):
    rs = request.getfixturevalue("real_store") if request.param == "real" else None
    s = _client(request.param, rs)
    yield s
    s.close()


def _buf(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, n, dtype=np.uint8)


def _key() -> str:
    return f"contract/{uuid.uuid4().hex}"


def _real_params(doc: str, name: str) -> list[str]:
    """Parameter names from pybind's signature line ``name(self: T, a: T, b: T = x) -> R``."""
    line = next(ln for ln in doc.splitlines() if f"{name}(self" in ln)
    inner = line[line.index(f"{name}(") + len(name) + 1 : line.rindex(") ->")]
    names, depth, cur = [], 0, ""
    for ch in inner + ",":
        if ch in "[(<":
            depth += 1
        elif ch in "])>":
            depth -= 1
        if ch == "," and depth == 0:
            names.append(cur.split(":")[0].strip())
            cur = ""
        else:
            cur += ch
    return [n for n in names if n != "self"]


def test_fake_methods_have_the_real_names_and_parameters():
    real = mooncake_store_mod.MooncakeDistributedStore
    fake = fake_mooncake.FakeMooncakeDistributedStore
    for name, fn in inspect.getmembers(fake, inspect.isfunction):
        if name.startswith("_"):
            continue
        assert hasattr(real, name), f"the real store has no {name}"
        real_names = _real_params(getattr(real, name).__doc__ or "", name)
        fake_names = [p for p in inspect.signature(fn).parameters if p != "self"]
        assert len(fake_names) == len(real_names), (name, fake_names, real_names)
        for f, r in zip(fake_names, real_names):
            assert r.startswith("arg") or f == r, (name, fake_names, real_names)


def test_multi_buffer_put_then_get_round_trips(client):
    a, b = _buf(4096, 1), _buf(40, 2)
    out_a, out_b = np.zeros_like(a), np.zeros_like(b)
    for arr in (a, b, out_a, out_b):
        assert client.register_buffer(arr.ctypes.data, arr.nbytes) == 0
    k = _key()
    assert client.batch_put_from_multi_buffers([k], [[a.ctypes.data, b.ctypes.data]], [[4096, 40]]) == [0]
    assert client.batch_is_exist([k, _key()]) == [1, 0]
    got = client.batch_get_into_multi_buffers([k], [[out_a.ctypes.data, out_b.ctypes.data]], [[4096, 40]])
    assert got == [4136]
    assert np.array_equal(out_a, a) and np.array_equal(out_b, b)


def test_get_of_a_missing_key_is_object_not_found(client):
    out = np.zeros(64, np.uint8)
    client.register_buffer(out.ctypes.data, out.nbytes)
    assert client.batch_get_into_multi_buffers([_key()], [[out.ctypes.data]], [[64]]) == [
        fake_mooncake.OBJECT_NOT_FOUND
    ]


def test_get_into_buffers_of_another_size_fails(client):
    a = _buf(256, 3)
    out = np.zeros(512, np.uint8)
    client.register_buffer(a.ctypes.data, a.nbytes)
    client.register_buffer(out.ctypes.data, out.nbytes)
    k = _key()
    assert client.batch_put_from_multi_buffers([k], [[a.ctypes.data]], [[256]]) == [0]
    assert client.batch_get_into_multi_buffers([k], [[out.ctypes.data]], [[128]]) == [
        fake_mooncake.BUFFER_TOO_SMALL
    ]
    assert client.batch_get_into_multi_buffers([k], [[out.ctypes.data]], [[512]]) == [
        fake_mooncake.TRANSFER_FAIL
    ]


def test_put_of_an_existing_key_succeeds_and_keeps_the_first_object(client):
    a, b, out = _buf(128, 4), _buf(128, 5), np.zeros(128, np.uint8)
    for arr in (a, b, out):
        client.register_buffer(arr.ctypes.data, arr.nbytes)
    k = _key()
    assert client.batch_put_from_multi_buffers([k], [[a.ctypes.data]], [[128]]) == [0]
    assert client.batch_put_from_multi_buffers([k], [[b.ctypes.data]], [[128]]) == [0]
    assert client.batch_get_into_multi_buffers([k], [[out.ctypes.data]], [[128]]) == [128]
    assert np.array_equal(out, a)


def test_removed_objects_no_longer_exist(client):
    a = _buf(64, 6)
    client.register_buffer(a.ctypes.data, a.nbytes)
    k1, k2 = _key(), _key()
    assert client.batch_put_from_multi_buffers([k1, k2], [[a.ctypes.data]] * 2, [[64]] * 2) == [0, 0]
    assert client.batch_remove([k1], True) == [0]
    assert client.batch_is_exist([k1, k2]) == [0, 1]


def test_remove_by_regex_removes_only_the_keys_under_a_prefix(client):
    a = _buf(64, 7)
    client.register_buffer(a.ctypes.data, a.nbytes)
    ns = f"contract/{uuid.uuid4().hex}/"
    mine, other = [ns + "x", ns + "y"], _key()
    assert client.batch_put_from_multi_buffers(mine + [other], [[a.ctypes.data]] * 3, [[64]] * 3) == [0, 0, 0]
    assert client.remove_by_regex("^" + re.escape(ns) + ".*", True) == 2
    assert client.batch_is_exist(mine + [other]) == [0, 0, 1]


def test_setup_against_no_master_fails_on_the_fake_as_on_the_real_store():
    # The real store takes ~90 s to give up on an absent master; kvconnect checks the port first
    # (tests/unit/test_mooncake_config.py). Here only the fake's convention is held: -1.
    fake_mooncake.cluster.reset()
    fake_mooncake.cluster.down = True
    try:
        assert fake_mooncake.FakeMooncakeDistributedStore().setup(
            "127.0.0.1", "P2PHANDSHAKE", 0, 0, "tcp", "", "127.0.0.1:1") == -1
    finally:
        fake_mooncake.cluster.reset()
