"""A host-pool-like object for HiCache storage tests: a real CPU ``kv_buffer`` tensor in one of
SGLang's MHA host layouts, whose page addressing is SGLang's own code
(``MHATokenToKVPoolHost.get_page_buffer_meta`` / ``get_data_page`` / ``set_from_flat_data_page``
called on this object), without the device pool the real host pool is built from."""

from __future__ import annotations

import torch


def make_host_pool(layout: str = "page_first", *, pages: int = 16, page_size: int = 4, layer_num: int = 2,
                   head_num: int = 2, head_dim: int = 8, dtype=torch.float16, seed: int = 0):
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost as Real

    class HostPoolLike:
        get_page_buffer_meta = Real.get_page_buffer_meta
        get_data_page = Real.get_data_page
        set_from_flat_data_page = Real.set_from_flat_data_page
        get_dummy_flat_data_page = Real.get_dummy_flat_data_page

    p = HostPoolLike()
    p.layout, p.page_size, p.layer_num, p.head_num, p.head_dim = (
        layout,
        page_size,
        layer_num,
        head_num,
        head_dim,
    )
    p.dtype, p.size, p.device, p.pin_memory = dtype, pages * page_size, "cpu", False
    shape = {
        "page_first": (2, p.size, layer_num, head_num, head_dim),
        "layer_first": (2, layer_num, p.size, head_num, head_dim),
    }[layout]
    g = torch.Generator().manual_seed(seed)
    p.kv_buffer = torch.randn(shape, generator=g).to(dtype)
    return p


def page_bytes(pool, page: int) -> bytes:
    """All bytes of one page (MHA or MLA pool) (token index ``page * page_size``), in SGLang's flat
    page order."""
    return (
        pool.get_data_page(page * pool.page_size, flat=True).contiguous().view(torch.uint8).numpy().tobytes()
    )


def make_mla_host_pool(layout: str = "page_first", *, pages: int = 16, page_size: int = 4, layer_num: int = 2,
                       kv_cache_dim: int = 24, dtype=torch.bfloat16, seed: int = 0):
    """The same for SGLang's MLA host pool (``MLATokenToKVPoolHost``'s page addressing): a page-first
    page is one contiguous piece holding every layer."""
    from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost as Real

    class MLAHostPoolLike:
        get_page_buffer_meta = Real.get_page_buffer_meta
        get_data_page = Real.get_data_page
        _storage_page_index = Real._storage_page_index

    p = MLAHostPoolLike()
    p.layout, p.page_size, p.layer_num, p.kv_cache_dim = layout, page_size, layer_num, kv_cache_dim
    p.dtype, p.size, p.device, p.pin_memory = dtype, pages * page_size, "cpu", False
    p.dcp_size, p.logical_page_size = 1, page_size
    shape = {
        "page_first": (p.size, layer_num, 1, kv_cache_dim),
        "layer_first": (layer_num, p.size, 1, kv_cache_dim),
    }[layout]
    g = torch.Generator().manual_seed(seed)
    p.kv_buffer = torch.randn(shape, generator=g).to(dtype)
    return p

