"""Pure arithmetic for SGLang's KV pools: which byte ranges a push writes, and whether two ranks'
pools can exchange pages at all. No I/O, no SGLang import.

SGLang describes a rank's KV pool as a list of buffers (one per layer and K/V plane for MHA, one
per layer for MLA), each an array of *pages* of ``item_len`` bytes (``page_size`` token slots).
A request's KV is a list of page indices per side; page ``p`` of buffer ``i`` is the byte range
``[p * item_len_i, (p + 1) * item_len_i)`` of region ``i``. Runs of pages consecutive on both sides
become one descriptor per buffer (:func:`kvconnect.layout.merge_paired_runs`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kvconnect.errors import LayoutError
from kvconnect.layout import merge_paired_runs


def page_runs(src_pages: Sequence[int], dst_pages: Sequence[int]) -> np.ndarray:
    """``[k, 3]`` ``(src_page, dst_page, count)`` runs, in transfer order."""
    runs = merge_paired_runs(list(map(int, src_pages)), list(map(int, dst_pages)))
    return np.asarray(runs, dtype=np.int64).reshape(-1, 3)


def write_descs(
    src_pages: Sequence[int],
    dst_pages: Sequence[int],
    item_lens: Sequence[int],
    src_num_pages: Sequence[int] | None = None,
    dst_num_pages: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Local and remote descriptor lists (``[n, 3]`` int64 ``(region, offset, nbytes)``, paired
    row for row) that copy pages ``src_pages`` of every buffer to pages ``dst_pages`` of the same
    buffer on the peer. ``*_num_pages`` (pages per buffer) bound-check the indices when given."""
    if len(src_pages) != len(dst_pages):
        raise LayoutError(f"{len(src_pages)} source pages but {len(dst_pages)} destination pages")
    for side, pages, limits in (("source", src_pages, src_num_pages), ("destination", dst_pages, dst_num_pages)):
        if limits is not None and len(pages):
            lo, hi = int(np.min(pages)), int(np.max(pages))
            cap = min(int(n) for n in limits)
            if lo < 0 or hi >= cap:
                raise LayoutError(f"{side} page index {lo if lo < 0 else hi} outside [0, {cap})")
    runs = page_runs(src_pages, dst_pages)
    lens = np.asarray(item_lens, dtype=np.int64)
    if runs.size == 0 or lens.size == 0:
        empty = np.zeros((0, 3), dtype=np.int64)
        return empty, empty.copy()
    nb, nr = lens.size, len(runs)
    region = np.repeat(np.arange(nb, dtype=np.int64), nr)
    ln = np.repeat(lens, nr)
    src = np.tile(runs[:, 0], nb) * ln
    dst = np.tile(runs[:, 1], nb) * ln
    size = np.tile(runs[:, 2], nb) * ln
    return np.stack([region, src, size], axis=1), np.stack([region, dst, size], axis=1)


def pool_mismatch(
    *,
    local_item_lens: Sequence[int],
    remote_item_lens: Sequence[int],
    local_page_size: int,
    remote_page_size: int,
    local_tp: int,
    remote_tp: int,
    is_mla: bool,
    local_dtype: str = "",
    remote_dtype: str = "",
) -> str | None:
    """Why a prefill rank cannot write pages into a decode rank's pool, or None when it can."""
    if local_page_size != remote_page_size:
        return f"page size differs: prefill {local_page_size}, decode {remote_page_size} (use the same --page-size)"
    if local_dtype and remote_dtype and local_dtype != remote_dtype:
        return f"KV cache dtype differs: prefill {local_dtype}, decode {remote_dtype}"
    if not is_mla and local_tp != remote_tp:
        return (
            f"attention TP differs (prefill {local_tp}, decode {remote_tp}): kvconnect's SGLang backend "
            "writes whole pages and needs equal attention TP for non-MLA models"
        )
    if len(local_item_lens) != len(remote_item_lens):
        return (
            f"prefill has {len(local_item_lens)} KV buffers, decode {len(remote_item_lens)} "
            "(different models, pipeline parallelism or draft layers on one side only)"
        )
    for i, (a, b) in enumerate(zip(local_item_lens, remote_item_lens)):
        if int(a) != int(b):
            return f"KV buffer {i}: page is {a} bytes on prefill, {b} on decode"
    return None


def num_pages(data_lens: Sequence[int], item_lens: Sequence[int]) -> list[int]:
    """Pages held by each buffer."""
    return [int(d) // int(i) if int(i) else 0 for d, i in zip(data_lens, item_lens)]
