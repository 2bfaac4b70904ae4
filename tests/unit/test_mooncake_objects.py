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
