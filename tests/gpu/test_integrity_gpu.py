"""KV integrity sums (:mod:`kvconnect.integrity`) computed where the KV lives equal, bit for bit,
an independent reference computed on the CPU from the raw bytes and the layout's strides, and
(on a GPU) the same sums taken over a CPU copy of the KV. A P/D consumer on a GPU compares its
sums with a producer's on a CPU (or another GPU): any difference fails a good load.

Every case also runs on CPU tensors as a unit test."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvconnect import integrity
from kvconnect.layout import MLA_DIMS, KVLayout
from tests.unit.pd_harness import make_layer

DEVICES = [pytest.param("cpu", marks=pytest.mark.unit, id="host"),
           pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")]


def _reference(
    t: torch.Tensor, lay: KVLayout, li: int, n_layers: int, ids, ebs: int, t0: int, t1: int
) -> np.ndarray:
    """One layer's share of the ``[tokens, heads]`` table, from the bytes and strides alone: per
    (token, head), the sum over kv planes of (row words . word weights) * layer weight, wrapping
    at 64 bits."""
    assert t.is_contiguous(), "the reference reads the tensor's bytes with its own strides"
    raw = t.cpu().view(torch.uint8).numpy().reshape(-1)
    tb, heads, kvs, row = lay.block_size, lay.num_heads, lay.size("kv"), lay.row_bytes
    word = 4 if row % 4 == 0 else 1
    w_word = integrity._weights_np(row // word, 1)
    w_layer = integrity._weights_np(2 * n_layers, 2)
    out = np.zeros((t1 - t0, heads), np.int64)
    with np.errstate(over="ignore"):  # int64 wrap-around is the definition
        for i, tok in enumerate(range(t0, t1)):
            blk = ids[tok // ebs] * (ebs // tb) + (tok % ebs) // tb
            for h in range(heads):
                for k in range(kvs):
                    o = (blk * lay.stride_bytes("block") + k * lay.stride_bytes("kv")
                         + h * lay.stride_bytes("head") + (tok % tb) * lay.stride_bytes("token"))
                    words = raw[o:o + row].view("<i4" if word == 4 else "u1").astype(np.int64)
                    out[i, h] += (words * w_word).sum() * w_layer[2 * li + k]
    return out


def _random_layers(kind: str, dtype, device: str, n: int = 3, block_size: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if kind == "odd-rows":  # 3-byte rows: summed as bytes, not int32 words
            t = torch.zeros(8, block_size, 3, dtype=torch.uint8)
            lay = KVLayout.of_tensor(t, MLA_DIMS)
        else:
            t, lay = make_layer(kind, 8, block_size, 4, dtype=dtype)
        t.view(-1).view(torch.uint8).copy_(
            torch.randint(0, 256, (t.numel() * t.element_size(),), dtype=torch.uint8, generator=gen))
        t = t.to(device)
        out.append((t, KVLayout.of_tensor(t, lay.dims)))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("kind", "dtype"),
    [(k, d) for k in ("flash", "hnd", "cpu", "mla") for d in (torch.bfloat16, torch.float32)]
    + [("odd-rows", torch.uint8)],
)
def test_sums_on_the_kvs_device_equal_the_byte_level_reference(device, kind, dtype):
    # kernel blocks of 8 tokens inside engine blocks of 16; a token range inside blocks
    layers = _random_layers(kind, dtype, device, block_size=8)
    ids, ebs, t0, t1 = [3, 1, 2], 16, 5, 44
    got = integrity.token_head_sums(layers, ids, ebs, t0, t1)
    want = sum(_reference(t, lay, li, len(layers), ids, ebs, t0, t1) for li, (t, lay) in enumerate(layers))
    assert got.dtype == np.int64 and np.array_equal(got, want)
    if device != "cpu":  # the same KV on the CPU gives the same table
        cpu = [(t.cpu(), lay) for t, lay in layers]
        assert np.array_equal(integrity.token_head_sums(cpu, ids, ebs, t0, t1), got)


@pytest.mark.parametrize("device", DEVICES)
def test_one_flipped_bit_on_the_device_changes_exactly_its_tokens_sum(device):
    layers = _random_layers("flash", torch.bfloat16, device)
    before = integrity.token_head_sums(layers, [2, 5], 16, 0, 32)
    t, lay = layers[1]
    # layer 1, V plane, block 5, token 3 -> request token 19
    t.view(torch.uint8)[1, 5, 3, 2, 7] ^= 0x40
    after = integrity.token_head_sums(layers, [2, 5], 16, 0, 32)
    assert list(np.flatnonzero((after != before).any(axis=1))) == [19]
    assert np.flatnonzero(after[19] != before[19]).tolist() == [2]  # only the head that changed
