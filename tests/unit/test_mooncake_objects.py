"""The stored object's checksum and header (kvconnect.backends.mooncake.objects): any changed byte
of a block fails verification, wherever it is, and a header of another version is refused."""

from __future__ import annotations

import numpy as np
import pytest

from kvconnect.backends.mooncake import objects as ob

# Three runs, the last one not a multiple of 8 bytes (a tail that is no whole word).
SIZES = [4096, 1024, 1000 + 5]


@pytest.fixture
def runs():
    rng = np.random.default_rng(7)
    bufs = [rng.integers(0, 256, n, dtype=np.uint8) for n in SIZES]
    return bufs, [b.ctypes.data for b in bufs]


@pytest.mark.parametrize("run, pos", [
    (0, 0), (0, 7), (0, 2048), (0, 4095),  # first byte, inside the first word, middle, last word
    (1, 513),
    (2, 0), (2, 999), (2, 1000), (2, 1004),  # the unaligned tail: its first and its last byte
])
@pytest.mark.parametrize("flip", [0x01, 0x80, 0xFF])
def test_a_flipped_byte_anywhere_changes_the_checksum(runs, run, pos, flip):
    bufs, ptrs = runs
    good = ob.checksum_of(ptrs, SIZES)
    bufs[run][pos] ^= flip
    assert ob.checksum_of(ptrs, SIZES) != good
    bufs[run][pos] ^= flip
    assert ob.checksum_of(ptrs, SIZES) == good


def test_swapped_words_and_swapped_runs_change_the_checksum(runs):
    bufs, ptrs = runs
    good = ob.checksum_of(ptrs, SIZES)
    w = bufs[0].view(np.uint64)
    w[[3, 9]] = w[[9, 3]]
    assert ob.checksum_of(ptrs, SIZES) != good
    w[[3, 9]] = w[[9, 3]]
    x, y = bufs[1], bufs[0][:1024].copy()  # two runs of one size, in the other order
    assert ob.checksum_of([x.ctypes.data, y.ctypes.data], [1024, 1024]) != \
        ob.checksum_of([y.ctypes.data, x.ctypes.data], [1024, 1024])


def test_the_checksum_depends_on_the_bytes_not_on_where_they_lie(runs):
    bufs, ptrs = runs
    copies = [b.copy() for b in bufs]
    assert ob.checksum_of([c.ctypes.data for c in copies], SIZES) == ob.checksum_of(ptrs, SIZES)


def test_a_header_of_another_version_is_refused():
    buf = np.zeros(ob.HEADER_BYTES, np.uint8)
    ob.pack_header(buf, 100, 42, b"L" * 8, b"K" * 16)
    assert ob.check_header(buf, 100, b"L" * 8, b"K" * 16) == (42, "")
    buf[4] = ob.VERSION - 1  # the version field (u16, little-endian) right after the magic
    crc, why = ob.check_header(buf, 100, b"L" * 8, b"K" * 16)
    assert crc is None and "version" in why


def test_both_xxh3_bindings_give_the_specified_digests():
    """The system library (GIL released) and the xxhash wheel are one function: instances using
    either share a store. XXH3-64 of no bytes is fixed by the specification."""
    from kvconnect.backends.mooncake import xxh3

    bindings = [f for f in (xxh3.system_xxh3_64, xxh3.wheel_xxh3_64) if f is not None]
    assert bindings, "no XXH3 binding: pip install xxhash or apt-get install libxxhash0"
    buf = np.random.default_rng(1).integers(0, 256, 300_000, dtype=np.uint8)
    for f in bindings:
        assert f(buf.ctypes.data, 0) == 0x2D06800538D394C2
    if len(bindings) < 2:
        pytest.skip("only one XXH3 binding here: nothing to compare it with")
    # Lengths across XXH3's code paths (<=16, <=128, <=240, long; an odd tail).
    for n in (1, 3, 8, 16, 17, 100, 128, 129, 240, 241, 1000, 131_077, 300_000):
        assert xxh3.system_xxh3_64(buf.ctypes.data, n) == xxh3.wheel_xxh3_64(buf.ctypes.data, n), n


def test_without_any_xxh3_binding_the_worker_and_the_checksum_name_the_fix(monkeypatch, master):
    from kvconnect.backends.mooncake import xxh3
    from kvconnect.errors import BackendUnavailableError
    from tests.unit.mooncake_harness import config, make_instance

    monkeypatch.setattr(xxh3, "xxh3_64", None)
    with pytest.raises(BackendUnavailableError, match="kvconnect\\[mooncake\\]"):
        make_instance(config(master))
    buf = np.zeros(8, np.uint8)
    with pytest.raises(BackendUnavailableError, match="libxxhash0"):
        ob.checksum_of([buf.ctypes.data], [8])
