"""KV-cache layouts and the pure arithmetic on them: byte ranges, block-size conversion,
contiguous-run merging, tensor-parallel head mapping. No I/O, no torch needed.

A layer's KV cache is described by the *names* of its tensor dimensions, its shape and strides,
never by the engine it came from:

``block``   engine block index (required)
``kv``      K / V plane (absent when K and V share a row, as on vLLM's CPU worker, or for MLA)
``head``    KV head (absent for MLA latent caches, which every TP rank holds whole)
``token``   token slot inside a block (required)
``feature`` the innermost vector: head_dim, 2*head_dim (K|V concatenated) or the MLA latent

Everything is computed from strides, so NHD, HND, K/V-first or block-first layouts, and views with
padding all work. A *row* is one ``(kv, head, token)`` feature vector; rows are enumerated in the
canonical order kv, head, token so that two layouts of the same model can be paired row for row
even when their memory orders differ.

A *feature-major* layout (``token`` has stride 1 and ``feature`` does not) stores each
``(kv, head)`` plane transposed, ``[feature, token]``: vLLM's CPU attention keeps its K cache that
way. Its contiguous pieces are then *runs*: one per ``(kv, head, feature)`` over the requested
token range. :func:`pair_rows` and :meth:`KVLayout.block_ranges` work on runs, so a token range of
a feature-major plane (block-size conversion) is correct too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import msgspec
import numpy as np

from kvconnect.errors import LayoutError

DIM_NAMES = ("block", "kv", "head", "token", "feature")

#: vLLM's CPU worker: ``[num_blocks, num_kv_heads, block_size, 2*head_dim]`` (K|V in the last dim).
VLLM_CPU_DIMS = ("block", "head", "token", "feature")
#: vLLM flash-attention on GPU: ``[2, num_blocks, block_size, num_kv_heads, head_dim]``.
FLASH_NHD_DIMS = ("kv", "block", "token", "head", "feature")
#: HND variant: ``[2, num_blocks, num_kv_heads, block_size, head_dim]``.
FLASH_HND_DIMS = ("kv", "block", "head", "token", "feature")
#: MLA latent cache: ``[num_blocks, block_size, kv_lora_rank + rope_dim]``.
MLA_DIMS = ("block", "token", "feature")


class KVLayout(msgspec.Struct, frozen=True, kw_only=True):
    """Shape and strides of one layer's KV cache tensor, with named dimensions."""

    dims: tuple[str, ...]
    shape: tuple[int, ...]
    #: Strides in elements, as ``torch.Tensor.stride()`` gives them.
    strides: tuple[int, ...]
    itemsize: int
    dtype: str = "unknown"
    #: KV-cache group (hybrid models have several); 0 for ordinary models.
    group: int = 0

    def __post_init__(self) -> None:
        if len(self.dims) != len(self.shape) or len(self.dims) != len(self.strides):
            raise LayoutError(
                f"dims {self.dims} do not match shape {self.shape} / strides {self.strides}"
            )
        unknown = [d for d in self.dims if d not in DIM_NAMES]
        if unknown:
            raise LayoutError(f"unknown dimension name(s) {unknown}; known: {DIM_NAMES}")
        if len(set(self.dims)) != len(self.dims):
            raise LayoutError(f"dimension names repeat in {self.dims}")
        for required in ("block", "token", "feature"):
            if required not in self.dims:
                raise LayoutError(f"layout {self.dims} lacks the required '{required}' dimension")
        if "kv" in self.dims and self.shape[self.dims.index("kv")] != 2:
            raise LayoutError(f"'kv' dimension must have size 2, got shape {self.shape}")
        if self.itemsize <= 0 or any(s <= 0 for s in self.shape):
            raise LayoutError(f"empty or invalid layout: shape {self.shape}, itemsize {self.itemsize}")
        if self.strides[self.dims.index("feature")] != 1 and (
            self.strides[self.dims.index("token")] != 1 or self.size("feature") == 1
        ):
            raise LayoutError(
                "the 'feature' dimension must be contiguous (stride 1), or the 'token' dimension "
                "for a feature-major ([feature, token]) plane"
            )

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def of_tensor(cls, tensor, dims: Sequence[str], group: int = 0) -> KVLayout:
        """Describe a torch tensor (or anything with shape/stride()/element_size())."""
        return cls(
            dims=tuple(dims),
            shape=tuple(int(s) for s in tensor.shape),
            strides=tuple(int(s) for s in tensor.stride()),
            itemsize=int(tensor.element_size()),
            dtype=str(tensor.dtype).replace("torch.", ""),
            group=group,
        )

    # -- sizes ----------------------------------------------------------------------------------
    def size(self, dim: str) -> int:
        return self.shape[self.dims.index(dim)] if dim in self.dims else 1

    def stride_bytes(self, dim: str) -> int:
        return self.strides[self.dims.index(dim)] * self.itemsize if dim in self.dims else 0

    @property
    def num_blocks(self) -> int:
        return self.size("block")

    @property
    def block_size(self) -> int:
        """Tokens per block."""
        return self.size("token")

    @property
    def num_heads(self) -> int:
        return self.size("head")

    @property
    def is_mla(self) -> bool:
        return "head" not in self.dims and "kv" not in self.dims

    @property
    def row_bytes(self) -> int:
        return self.size("feature") * self.itemsize

    @property
    def feature_major(self) -> bool:
        """Each (kv, head) plane is stored ``[feature, token]`` (token contiguous)."""
        return self.strides[self.dims.index("feature")] != 1

    def run_bytes(self, tokens: tuple[int, int] | None = None) -> int:
        """Bytes of one contiguous piece of :meth:`row_offsets`: a row, or for a feature-major
        layout one feature's run over ``tokens``."""
        if not self.feature_major:
            return self.row_bytes
        t0, t1 = _check_range("token", tokens, self.block_size)
        return (t1 - t0) * self.itemsize

    @property
    def block_bytes(self) -> int:
        """Payload bytes of one block (all rows), whatever the padding between them."""
        return self.size("kv") * self.num_heads * self.block_size * self.row_bytes

    @property
    def span_bytes(self) -> int:
        """Bytes from the tensor's first element to one past its last."""
        return (sum((n - 1) * s for n, s in zip(self.shape, self.strides)) + 1) * self.itemsize

    def signature(self) -> tuple:
        """What two compatible peers must agree on (per layer), independent of block count,
        block size, TP split and memory order."""
        sig = ("mla" if self.is_mla else "mha", "kv" in self.dims, self.size("feature"), self.dtype)
        return sig + ("feature-major",) if self.feature_major else sig

    # -- byte ranges ------------------------------------------------------------------------------
    def row_offsets(
        self, tokens: tuple[int, int] | None = None, heads: tuple[int, int] | None = None
    ) -> np.ndarray:
        """Byte offsets, relative to the block's start, of the rows of one block in canonical
        (kv, head, token) order. ``tokens`` and ``heads`` are half-open ranges of this tensor's
        token slots and (local) heads. For a feature-major layout: the starts of the runs, in
        (kv, head, feature) order (each :meth:`run_bytes` long)."""
        return _row_offsets(self, tokens, heads)

    def block_ranges(
        self,
        block_id: int,
        tokens: tuple[int, int] | None = None,
        heads: tuple[int, int] | None = None,
    ) -> list[tuple[int, int]]:
        """``(offset, nbytes)`` byte ranges of one block (relative to the tensor's data pointer),
        contiguous pieces merged."""
        if not 0 <= block_id < self.num_blocks:
            raise LayoutError(f"block id {block_id} outside [0, {self.num_blocks})")
        rows = np.sort(self.row_offsets(tokens, heads)) + block_id * self.stride_bytes("block")
        segs = merge_segments(
            np.stack([rows, rows, np.full_like(rows, self.run_bytes(tokens))], axis=1)
        )
        return [(int(o), int(n)) for o, _, n in segs]


def _check_range(name: str, rng: tuple[int, int] | None, size: int) -> tuple[int, int]:
    if rng is None:
        return 0, size
    lo, hi = rng
    if not 0 <= lo < hi <= size:
        raise LayoutError(f"{name} range {rng} outside [0, {size}]")
    return lo, hi


@lru_cache(maxsize=4096)
def _row_offsets(
    layout: KVLayout, tokens: tuple[int, int] | None, heads: tuple[int, int] | None
) -> np.ndarray:
    t0, t1 = _check_range("token", tokens, layout.block_size)
    h0, h1 = _check_range("head", heads, layout.num_heads)
    kv = np.arange(layout.size("kv"), dtype=np.int64) * layout.stride_bytes("kv")
    hd = np.arange(h0, h1, dtype=np.int64) * layout.stride_bytes("head")
    if layout.feature_major:  # one run per feature, starting at the first token
        tk = np.arange(layout.size("feature"), dtype=np.int64) * layout.stride_bytes("feature")
        tk += t0 * layout.stride_bytes("token")
    else:
        tk = np.arange(t0, t1, dtype=np.int64) * layout.stride_bytes("token")
    out = (kv[:, None, None] + hd[None, :, None] + tk[None, None, :]).reshape(-1)
    out.setflags(write=False)  # cached: callers must not mutate it
    return out


# -- segments -------------------------------------------------------------------------------------
def merge_segments(segs: np.ndarray) -> np.ndarray:
    """Merge ``[n, 3]`` rows of ``(src_offset, dst_offset, nbytes)`` where a row continues the
    previous one on *both* sides. Order is kept (callers give them in transfer order)."""
    segs = np.asarray(segs, dtype=np.int64).reshape(-1, 3)
    if len(segs) <= 1:
        return segs.copy()
    src, dst, ln = segs[:, 0], segs[:, 1], segs[:, 2]
    cont = (src[1:] == src[:-1] + ln[:-1]) & (dst[1:] == dst[:-1] + ln[:-1])
    starts = np.flatnonzero(np.concatenate(([True], ~cont)))
    lengths = np.add.reduceat(ln, starts)
    return np.stack([src[starts], dst[starts], lengths], axis=1)


def pair_rows(
    local: KVLayout,
    remote: KVLayout,
    local_tokens: tuple[int, int] | None = None,
    remote_tokens: tuple[int, int] | None = None,
    local_heads: tuple[int, int] | None = None,
    remote_heads: tuple[int, int] | None = None,
) -> np.ndarray:
    """Pair the rows of a local block region with those of a remote one, row for row in canonical
    order. Returns ``[k, 3]`` ``(local_rel, remote_rel, nbytes)`` relative to each block's start,
    in local memory order, merged where both sides are contiguous."""
    if (
        local.row_bytes != remote.row_bytes
        or local.size("kv") != remote.size("kv")
        or local.feature_major != remote.feature_major
    ):
        raise LayoutError(
            f"layouts cannot be paired: row bytes {local.row_bytes} vs {remote.row_bytes}, "
            f"kv planes {local.size('kv')} vs {remote.size('kv')}, feature-major "
            f"{local.feature_major} vs {remote.feature_major}"
        )
    run = local.run_bytes(local_tokens)
    if run != remote.run_bytes(remote_tokens):
        raise LayoutError(f"token ranges differ in length: {local_tokens} vs {remote_tokens}")
    lo = local.row_offsets(local_tokens, local_heads)
    ro = remote.row_offsets(remote_tokens, remote_heads)
    if lo.shape != ro.shape:
        raise LayoutError(f"regions differ in size: {lo.size} local rows vs {ro.size} remote rows")
    order = np.argsort(lo, kind="stable")
    return merge_segments(np.stack([lo[order], ro[order], np.full_like(lo, run)], axis=1))


def merge_paired_runs(src: Sequence[int], dst: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(src_start, dst_start, length)`` runs where both id lists advance by one together.
    Order is kept: pairs are transferred as given."""
    if len(src) != len(dst):
        raise LayoutError(f"paired id lists differ in length: {len(src)} vs {len(dst)}")
    if len(src) == 0:
        return []
    s = np.asarray(src, dtype=np.int64)
    d = np.asarray(dst, dtype=np.int64)
    cont = (np.diff(s) == 1) & (np.diff(d) == 1)
    starts = np.flatnonzero(np.concatenate(([True], ~cont)))
    ends = np.concatenate((starts[1:], [len(s)]))
    return [(int(s[a]), int(d[a]), int(b - a)) for a, b in zip(starts, ends)]


# -- tensor parallelism ---------------------------------------------------------------------------
def rank_heads(num_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """Global KV-head range ``[start, stop)`` held by a TP rank. When TP exceeds the head count
    each head is replicated on ``tp_size // num_heads`` consecutive ranks."""
    if tp_size <= 0 or not 0 <= tp_rank < tp_size:
        raise LayoutError(f"tp rank {tp_rank} outside TP size {tp_size}")
    if num_heads <= 0:
        raise LayoutError(f"num_heads must be positive, got {num_heads}")
    if tp_size <= num_heads:
        if num_heads % tp_size:
            raise LayoutError(f"{num_heads} KV heads do not split over TP {tp_size}")
        per = num_heads // tp_size
        return tp_rank * per, (tp_rank + 1) * per
    if tp_size % num_heads:
        raise LayoutError(f"TP {tp_size} is not a multiple of {num_heads} KV heads")
    head = tp_rank // (tp_size // num_heads)
    return head, head + 1


@dataclass(frozen=True, slots=True)
class HeadSlice:
    """``count`` heads that a consumer rank takes from one producer rank."""

    remote_rank: int
    #: First head, as an index into the remote rank's own head dimension.
    remote_head: int
    #: First head, as an index into the local rank's own head dimension.
    local_head: int
    count: int


def head_sources(
    num_heads: int, local_tp: int, local_rank: int, remote_tp: int, is_mla: bool = False
) -> list[HeadSlice]:
    """Which heads of which remote ranks this local rank needs, de-duplicated: each local head is
    read from exactly one remote rank. MLA caches are replicated: read the whole block from one
    rank (spread over remote ranks by local rank)."""
    if local_tp <= 0 or remote_tp <= 0 or not 0 <= local_rank < local_tp:
        raise LayoutError(f"bad TP sizes/rank: local {local_rank}/{local_tp}, remote {remote_tp}")
    if is_mla:
        return [HeadSlice(local_rank % remote_tp, 0, 0, 1)]
    lo, hi = rank_heads(num_heads, local_tp, local_rank)
    out: list[HeadSlice] = []
    for head in range(lo, hi):
        holders = [
            r for r in range(remote_tp) if rank_heads(num_heads, remote_tp, r)[0] <= head
            and head < rank_heads(num_heads, remote_tp, r)[1]
        ]
        # Replicated heads: spread readers over the replicas instead of all hitting the first.
        src = holders[local_rank % len(holders)]
        r_lo = rank_heads(num_heads, remote_tp, src)[0]
        prev = out[-1] if out else None
        if (
            prev is not None
            and prev.remote_rank == src
            and prev.remote_head + prev.count == head - r_lo
            and prev.local_head + prev.count == head - lo
        ):
            out[-1] = HeadSlice(src, prev.remote_head, prev.local_head, prev.count + 1)
        else:
            out.append(HeadSlice(src, head - r_lo, head - lo, 1))
    return out


def head_targets(
    num_heads: int, producer_tp: int, producer_rank: int, consumer_tp: int, is_mla: bool = False
) -> dict[int, list[HeadSlice]]:
    """The push-side view: for each consumer rank, the slices it takes from ``producer_rank``
    (``remote_rank`` in each slice is the producer). Consistent with :func:`head_sources`, so
    every consumer head is written by exactly one producer."""
    out: dict[int, list[HeadSlice]] = {}
    for c in range(consumer_tp):
        mine = [
            s
            for s in head_sources(num_heads, consumer_tp, c, producer_tp, is_mla)
            if s.remote_rank == producer_rank
        ]
        if mine:
            out[c] = mine
    return out
