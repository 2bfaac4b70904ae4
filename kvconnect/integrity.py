"""KV integrity checksums for P/D transfer: fast, non-cryptographic, computed where the bytes are.

A producer and a consumer lay out the same KV differently (block size, TP split of the heads,
memory order), so a checksum of raw engine blocks would not compare. Instead both sides reduce
the KV of a request to one 64-bit sum per **(token, KV head)** over every layer of a KV-cache
group, on a canonical ``[token, kv, head, feature]`` view:

    sum[t, h] = sum over layers l, kv k, words i of  x[l, t, k, h, i] * w_word[i] * w_layer[l, k]

in wrap-around int64 arithmetic, with odd weights (so any single changed word changes the sum)
drawn once from a fixed seed. Words are the feature bytes read as int32 (as uint8 when a row is
not a multiple of 4 bytes). The sums are computed with torch on the tensors' own device (CPU or
GPU; integer sums are exact, so both agree bit for bit), and only the small ``[tokens, heads]``
table leaves the device.

The producer takes the table of a request when it leases its blocks; a consumer fetches it from
each producer rank it loads from, computes its own table over what it received, and compares the
heads it got from that rank token by token. A mismatching token names its engine block.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from kvconnect.layout import KVLayout

_SEED = 0x6B76_636F_6E6E_6563  # "kvconnec"
_CANON = ("block", "kv", "head", "token", "feature")


@lru_cache(maxsize=64)
def _weights_np(n: int, salt: int) -> np.ndarray:
    rng = np.random.default_rng([_SEED, salt, n])
    return rng.integers(-(2**62), 2**62, size=n, dtype=np.int64) | 1


_device_weights: dict[tuple[int, int, str], torch.Tensor] = {}


def _weights(n: int, salt: int, device: torch.device) -> torch.Tensor:
    import torch

    key = (n, salt, str(device))
    w = _device_weights.get(key)
    if w is None:
        w = _device_weights[key] = torch.from_numpy(_weights_np(n, salt)).to(device)
    return w


def canonical(tensor: torch.Tensor, layout: KVLayout) -> torch.Tensor:
    """``[block, kv, head, token, feature]`` view of one layer (kv / head of size 1 when absent)."""
    x, dims = tensor, list(layout.dims)
    for d in ("kv", "head"):
        if d not in dims:
            x = x.unsqueeze(-1)
            dims.append(d)
    return x.permute([dims.index(d) for d in _CANON])


def token_head_sums(
    layers: Sequence[tuple[torch.Tensor, KVLayout]],
    block_ids: Sequence[int],
    engine_block_size: int,
    token_start: int,
    token_end: int,
) -> np.ndarray:
    """``int64 [token_end - token_start, heads]`` sums over ``layers`` (all of one KV-cache group,
    in model order) for tokens ``[token_start, token_end)`` of a request whose engine blocks are
    ``block_ids``. Tokens past the last block raise ``IndexError``."""
    import torch

    n = token_end - token_start
    if not layers or n <= 0:
        return np.zeros((max(n, 0), 0), np.int64)
    device = layers[0][0].device
    ids = torch.as_tensor(list(block_ids), dtype=torch.int64)
    tok = torch.arange(token_start, token_end, dtype=torch.int64)
    pos = tok // engine_block_size
    if n and int(pos[-1]) >= ids.numel():
        raise IndexError(f"block ids cover {ids.numel() * engine_block_size} tokens, need {token_end}")
    eng = ids[pos]
    acc: torch.Tensor | None = None
    for li, (t, lay) in enumerate(layers):
        tb = lay.block_size
        blk = (eng * (engine_block_size // tb) + (tok % engine_block_size) // tb).to(device)
        off = (tok % tb).to(device)
        x = canonical(t, lay)[blk, :, :, off, :].contiguous()  # [T, kv, head, feature]
        row = x.shape[-1] * x.element_size()
        # Flattened first: contiguous() leaves odd strides on size-1 dims (MLA, vLLM CPU: no kv
        # or head dim), which view() to a wider dtype refuses for 2-byte elements.
        flat = x.reshape(-1, x.shape[-1])
        words = (flat.view(torch.int32) if row % 4 == 0 else flat.view(torch.uint8)).reshape(*x.shape[:3], -1)
        s = (words.to(torch.int64) * _weights(words.shape[-1], 1, device)).sum(-1)  # [T, kv, head]
        wl = _weights(2 * len(layers), 2, device)[2 * li: 2 * li + s.shape[1]]
        s = (s * wl[None, :, None]).sum(1)  # [T, head]
        acc = s if acc is None else acc + s
    assert acc is not None
    return acc.cpu().numpy()
