"""What one stored object is: one engine block of one rank, every layer, plus a header.

The object is the concatenation of the block's bytes in each layer (model order; within a layer,
the block's contiguous runs in memory order) followed by a 40-byte header::

    magic "KVC1" | version u16 | reserved u16 | payload bytes u64 | checksum u64 | layout 8 B | key 8 B

Puts and gets name the engine's own memory for every run (Mooncake's multi-buffer batch calls),
so no byte is copied on this side; only the header goes through a small registered buffer. A get
is accepted only when Mooncake returns exactly ``payload + header`` bytes, the header's magic,
version, size, layout and key match, and the checksum (:func:`checksum_of`) of what landed in the
engine's blocks equals the stored one.
"""

from __future__ import annotations

import ctypes
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvconnect.backends.cpu_offload.rows import block_shape
from kvconnect.errors import LayoutError
from kvconnect.layout import KVLayout

MAGIC = b"KVC1"
VERSION = 2  # 2: weighted-sum checksum (1 was CRC-32)
_HEADER = struct.Struct("<4sHHQQ8s8s")
HEADER_BYTES = _HEADER.size  # 40


@dataclass(frozen=True, slots=True)
class LayerRuns:
    """Where one block of one layer lies: ``base + block * block_stride + offset`` for each run."""

    base: int
    block_stride: int
    runs: tuple[tuple[int, int], ...]  # (offset, bytes)
    num_blocks: int


def _runs(lay: KVLayout) -> tuple[tuple[int, int], ...]:
    """Contiguous byte runs of one block (block index 0), merged where they touch."""
    bd = lay.dims.index("block")
    dims = [i for i in range(len(lay.dims)) if i != bd]
    # Innermost dims that are contiguous form one run; the rest enumerate runs.
    run = lay.itemsize
    inner = 0
    for i in reversed(dims):
        if lay.shape[i] == 1 or lay.strides[i] * lay.itemsize == run:
            run *= lay.shape[i]
            inner += 1
        else:
            break
    outer = dims[: len(dims) - inner]
    offsets = [0]
    for i in outer:
        step = lay.strides[i] * lay.itemsize
        offsets = [o + k * step for o in offsets for k in range(lay.shape[i])]
    offsets.sort()
    merged: list[list[int]] = []
    for o in offsets:
        if merged and merged[-1][0] + merged[-1][1] == o:
            merged[-1][1] += run
        else:
            merged.append([o, run])
    return tuple((o, n) for o, n in merged)


def layer_runs(tensor: torch.Tensor, lay: KVLayout) -> LayerRuns:
    if tensor.device.type != "cpu":
        raise LayoutError(
            f"mooncake: KV caches on {tensor.device} are not supported yet (this backend moves "
            "bytes zero-copy from host memory: vLLM's CPU worker)"
        )
    bd = lay.dims.index("block")
    return LayerRuns(tensor.data_ptr(), lay.strides[bd] * lay.itemsize, _runs(lay), lay.num_blocks)


def layout_parts(caches: Mapping[str, tuple[torch.Tensor, KVLayout]]) -> list[object]:
    """What names a rank's layout for :func:`keys.layout_digest`."""
    return [(lay.dims, block_shape(lay), lay.dtype, lay.itemsize, _runs(lay)) for _, lay in caches.values()]


class BlockObjects:
    """Runs of every block of one rank's registered KV caches."""

    def __init__(self, layers: Sequence[LayerRuns]) -> None:
        if not layers:
            raise LayoutError("mooncake: no KV layers")
        self.layers = list(layers)
        self.num_blocks = min(lr.num_blocks for lr in layers)
        self.payload_bytes = sum(n for lr in layers for _, n in lr.runs)

    def runs(self, block: int) -> tuple[list[int], list[int]]:
        """Addresses and sizes of one block's runs, in object order."""
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block id {block} outside [0, {self.num_blocks})")
        ptrs, sizes = [], []
        for lr in self.layers:
            b = lr.base + block * lr.block_stride
            for off, n in lr.runs:
                ptrs.append(b + off)
                sizes.append(n)
        return ptrs, sizes


_weights: dict[int, np.ndarray] = {}


def _odd_weights(n: int) -> np.ndarray:
    w = _weights.get(n)
    if w is None:
        w = _weights[n] = np.arange(n, dtype=np.uint64) * np.uint64(2) + np.uint64(0x9E3779B97F4A7C15 | 1)
    return w


def checksum_of(ptrs: Sequence[int], sizes: Sequence[int]) -> int:
    """64-bit checksum over memory runs: per run, the sum of its 8-byte words times distinct odd
    weights (mod 2^64), folded over runs with an odd multiplier per run. Any change of one word
    changes it (an odd weight is invertible mod 2^64), and so do moved words or runs. Twice as
    fast as zlib's CRC-32 here (8 vs 4 GB/s on one core), which is what the shared tier's
    bandwidth on a busy host is bound by; a run whose size is not a multiple of 8 bytes is folded
    in with CRC-32."""
    total = 0
    for k, (p, n) in enumerate(zip(ptrs, sizes)):
        raw = (ctypes.c_char * n).from_address(p)
        if n % 8:
            part = zlib.crc32(raw)
        else:
            words = np.frombuffer(raw, dtype=np.uint64)
            part = int(np.dot(words, _odd_weights(len(words))))
        total = (total * 0x100000001B3 + part * (2 * k + 1)) & 0xFFFF_FFFF_FFFF_FFFF
    return total


def pack_header(out: np.ndarray, payload: int, crc: int, layout: bytes, key: bytes) -> None:
    _HEADER.pack_into(out, 0, MAGIC, VERSION, 0, payload, crc, layout, key[:8])


def check_header(buf: np.ndarray, payload: int, layout: bytes, key: bytes) -> tuple[int | None, str]:
    """The stored checksum, or None and why the header does not fit this object."""
    magic, version, _, size, crc, lay, k = _HEADER.unpack_from(buf, 0)
    if magic != MAGIC or version != VERSION:
        return None, "not a kvconnect object (bad magic/version)"
    if size != payload:
        return None, f"holds {size} payload bytes, this rank's block has {payload}"
    if lay != layout:
        return None, "stored with another KV layout"
    if k != key[:8]:
        return None, "header names another block"
    return crc, ""


class HeaderPool:
    """Registered header buffers, one per object of a batch."""

    def __init__(self, n: int) -> None:
        self.array = np.zeros((n, HEADER_BYTES), np.uint8)
        self.base = self.array.ctypes.data
        self.nbytes = self.array.nbytes

    def ptr(self, i: int) -> int:
        return self.base + i * HEADER_BYTES
