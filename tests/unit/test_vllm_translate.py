"""The vLLM adapter's translations, on plain objects with vLLM's attribute names."""

import enum
from types import SimpleNamespace as NS

import pytest
import torch

from kvconnect.adapters.vllm_translate import (
    VllmRequestView,
    block_ids_of,
    engine_info,
    finish_reason,
    layer_entries,
    layer_layout,
    step_view,
)
from kvconnect.errors import LayoutError
from kvconnect.layout import FLASH_HND_DIMS, FLASH_NHD_DIMS, MLA_DIMS, VLLM_CPU_DIMS

pytestmark = pytest.mark.unit


class FinishReason(enum.Enum):
    STOP = 0
    LENGTH = 1
    ABORT = 2


class FullAttentionSpec(NS):
    pass


class MLAAttentionSpec(NS):
    pass


class SlidingWindowSpec(NS):
    pass


class RSWASpec(FullAttentionSpec):
    pass


def _req(**kw):
    base = dict(request_id="r1", prompt_token_ids=[1, 2, 3], all_token_ids=[1, 2, 3, 9],
                block_hashes=[b"h"], kv_transfer_params={"do_remote_decode": True},
                cache_salt=None, get_finished_reason=lambda: None)
    base.update(kw)
    return NS(**base)


def test_request_view_carries_ids_tokens_hashes_and_params():
    v = VllmRequestView(_req())
    assert v.request_id == "r1" and list(v.prompt_token_ids) == [1, 2, 3]
    assert v.block_hashes == [b"h"] and v.transfer_params == {"do_remote_decode": True}
    assert v.finish_reason is None


@pytest.mark.parametrize("reason,word", [(FinishReason.LENGTH, "length"), (FinishReason.STOP, "stop"),
                                         (FinishReason.ABORT, "abort")])
def test_finish_reason_words(reason, word):
    assert finish_reason(_req(get_finished_reason=lambda: reason)) == word


def test_finish_reason_from_status_when_no_reason_method():
    status = NS(name="FINISHED_ABORTED")
    assert finish_reason(NS(status=status)) == "abort"
    assert finish_reason(NS(status=NS(name="RUNNING"))) is None


def test_block_ids_from_kv_cache_blocks_or_tuples():
    assert block_ids_of(NS(get_block_ids=lambda: ([1, 2], [3]))) == ([1, 2], [3])
    assert block_ids_of(([4],)) == ([4],)
    assert block_ids_of(None) == ([],)


def test_step_view_from_scheduler_output():
    out = NS(
        finished_req_ids={"done"},
        preempted_req_ids=None,
        num_scheduled_tokens={"a": 5, "b": 1},
        scheduled_new_reqs=[NS(req_id="a", block_ids=([1, 2],), num_computed_tokens=0)],
        scheduled_cached_reqs=NS(req_ids=["b"], new_block_ids=[None], num_computed_tokens=[64],
                                 resumed_req_ids=set()),
    )
    step = step_view(out)
    assert step.finished_request_ids == {"done"}
    a, b = step.scheduled
    assert a.request_id == "a" and a.is_new and a.num_scheduled_tokens == 5 and a.new_block_ids == ([1, 2],)
    assert b.request_id == "b" and not b.is_new and b.new_block_ids == () and b.num_computed_tokens == 64


def _spec(cls=FullAttentionSpec, **kw):
    base = dict(block_size=32, num_kv_heads=2, head_size=64, head_size_v=64, dtype=torch.float32,
                page_size_bytes=2 * 32 * 128 * 4)
    base.update(kw)
    return cls(**base)


def test_cpu_worker_cache_is_two_entries_transposed_k_then_v_per_block_and_head():
    # vLLM's CPU kernel (measured): per (block, head) the K plane is stored [head_dim, block_size]
    # (element (t, d) at d * bs + t), then the V plane [block_size, head_dim].
    t = torch.arange(10 * 2 * 32 * 128, dtype=torch.float32).reshape(10, 2, 32, 128)
    (kn, k, klay), (vn, v, vlay) = layer_entries("layers.0.attn", t, _spec(), group=0)
    assert (kn, vn) == ("layers.0.attn.k", "layers.0.attn.v")
    assert klay.feature_major and not vlay.feature_major
    assert klay.block_bytes + vlay.block_bytes == 2 * 32 * 128 * 4
    flat = t.reshape(-1)
    base = (3 * 2 + 1) * 32 * 128  # block 3, head 1
    assert torch.equal(k[3, 1, 5], flat[base + 5 * 32 : base + 6 * 32])  # feature 5, all tokens
    assert torch.equal(v[3, 1, 7], flat[base + 32 * 64 + 7 * 64 : base + 32 * 64 + 8 * 64])  # token 7
    # Tokens 8..16 of head 1 in block 3: one 8-token run per K feature, one V range.
    ranges = klay.block_ranges(3, tokens=(8, 16), heads=(1, 2))
    assert len(ranges) == 64 and all(n == 8 * 4 for _, n in ranges)
    assert ranges[0][0] == (3 * klay.strides[0] + klay.strides[1] + 8) * 4
    ((off_v, n_v),) = vlay.block_ranges(3, tokens=(8, 16), heads=(1, 2))
    assert n_v == 8 * 64 * 4 and off_v == (3 * vlay.strides[0] + vlay.strides[1] + 8 * 64) * 4


def test_cpu_worker_cache_is_not_described_as_one_plain_tensor():
    with pytest.raises(LayoutError, match="layer_entries"):
        layer_layout(torch.zeros(10, 2, 32, 128), _spec(), group=0)


def test_meta_device_layout_keeps_the_plain_dims():
    t = torch.zeros(10, 2, 32, 128, device="meta")
    assert layer_layout(t, _spec(), group=0)[1].dims == VLLM_CPU_DIMS


def test_flash_layouts_follow_the_hint_when_ambiguous():
    t = torch.zeros(2, 10, 16, 16, 64)  # heads == block size: NHD and HND look alike
    spec = _spec(block_size=16, num_kv_heads=16)
    assert layer_layout(t, spec, 0)[1].dims == FLASH_NHD_DIMS
    assert layer_layout(t, spec, 0, kv_layout_hint="HND")[1].dims == FLASH_HND_DIMS


def test_mla_layout_squeezes_the_single_head():
    t = torch.zeros(10, 1, 16, 576)
    view, layout = layer_layout(t, _spec(MLAAttentionSpec, block_size=16, num_kv_heads=1, head_size=576,
                                         head_size_v=0), group=1)
    assert layout.dims == MLA_DIMS and layout.is_mla and layout.group == 1
    assert view.data_ptr() == t.data_ptr()


def test_unknown_shape_is_a_clear_error():
    with pytest.raises(LayoutError, match="cannot name the dims"):
        layer_layout(torch.zeros(10, 3, 32, 128), _spec(), 0)


def test_engine_info_from_vllm_config():
    groups = [NS(layer_names=["l0", "l1"], kv_cache_spec=_spec()),
              NS(layer_names=["l2"], kv_cache_spec=_spec(block_size=64, page_size_bytes=100))]
    cfg = NS(
        kv_transfer_config=NS(engine_id="eng", kv_role="kv_producer"),
        model_config=NS(hf_config=NS(architectures=["LlamaForCausalLM"]), model="m",
                        get_total_num_kv_heads=lambda: 2, dtype=torch.float32),
        parallel_config=NS(tensor_parallel_size=1, data_parallel_rank=0),
        cache_config=NS(block_size=32),
    )
    info = engine_info(cfg, NS(kv_cache_groups=groups), tp_rank=0)
    assert info.engine_id == "eng" and info.role == "kv_producer"
    assert info.block_sizes == (32, 64)
    assert info.kv_bytes_per_block == 2 * (2 * 32 * 128 * 4) + 100
    assert info.layer_groups == (("l0", "l1"), ("l2",))
    assert info.model_signature["num_layers"] == 3


def test_engine_info_names_each_groups_attention_window_and_the_null_block():
    groups = [NS(layer_names=["l0"], kv_cache_spec=_spec(SlidingWindowSpec, sliding_window=64)),
              NS(layer_names=["l1"], kv_cache_spec=_spec(sliding_window=None)),
              NS(layer_names=["l2"], kv_cache_spec=_spec(RSWASpec, sliding_window=64))]
    cfg = NS(
        kv_transfer_config=NS(engine_id="eng", kv_role="kv_both"),
        model_config=NS(hf_config=NS(architectures=["Gemma3ForCausalLM"]), model="m",
                        get_total_num_kv_heads=lambda: 2, dtype=torch.float32),
        parallel_config=NS(tensor_parallel_size=1, data_parallel_rank=0),
        cache_config=NS(block_size=32),
    )
    info = engine_info(cfg, NS(kv_cache_groups=groups))
    # a subclass with a manager of its own is named, not taken for full attention
    assert info.group_kinds == ("sliding_window", "full_attention", "RSWASpec")
    assert info.sliding_windows == (64, 0, 0)
    assert info.null_block_id == 0
