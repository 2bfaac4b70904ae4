"""The mooncake backend's staging path (KV caches the store cannot reach zero-copy) on
FakeMooncakeDistributedStore, run on CPU tensors with ``staging="always"``: objects identical to
the zero-copy path's, loads and stores larger than the buffer in chunks, and nothing unverified
ever written into the engine's blocks. tests/gpu/test_mooncake_staging_gpu.py runs it on CUDA."""

from __future__ import annotations

import pytest
import torch

from kvconnect.api import RequestView
from kvconnect.errors import ConfigError, LayoutError
from kvconnect.layout import VLLM_CPU_DIMS, KVLayout
from tests.fakes import fake_mooncake
from tests.unit.mooncake_harness import BS, config, make_instance

PROMPT = list(range(3000, 3000 + 6 * BS + 5))  # 6 full blocks and a partial one
OBJECT = 2 * (2 * BS * 16 * 4)  # payload bytes of one block of the harness's 2 fp32 layers
SENTINEL = -7.0


@pytest.fixture
def instances(master):
    made = []

    def make(**kw):
        opts = {k: kw.pop(k) for k in ("layers", "device") if k in kw}
        inst = make_instance(config(master, **kw), engine_id=f"e{len(made)}", **opts)
        made.append(inst)
        return inst

    yield make
    for inst in made:
        inst.shutdown()


def _load(b, rid, blocks):
    req = RequestView(rid, PROMPT)
    n, _ = b.lookup(req)
    b.sched.update_state_after_alloc(req, (blocks,), n)
    return n, b.wait_for(lambda r: rid in r.finished_recving)


def _object_of(inst, block):
    """The store key of the object whose payload starts with ``block``'s first layer bytes."""
    head = inst.kv[0][block].cpu().numpy().tobytes()[:64]
    return next(k for k, v in fake_mooncake.cluster.objects.items() if v[:64] == head)


def test_staging_always_stages_host_caches_and_registers_only_the_buffer(instances):
    a = instances(staging="always")
    assert a.worker.io.staging is not None
    registered = set(a.worker._shared.store.buffers)
    assert a.worker.io.staging.ptr in registered
    assert not any(t.data_ptr() in registered for t in a.kv)  # the engine's memory is never named


@pytest.mark.parametrize("store_mode, load_mode", [("always", "never"), ("never", "always"),
                                                   ("always", "always")])
def test_staged_and_zero_copy_objects_are_the_same_bytes(instances, store_mode, load_mode):
    a, b = instances(staging=store_mode), instances(staging=load_mode)
    a.serve_and_store(RequestView("r1", PROMPT), list(range(1, 8)))
    n, out = _load(b, "r2", list(range(10, 17)))
    assert n == 6 * BS and not out.invalid_block_ids
    for la, lb in zip(a.kv, b.kv):
        assert torch.equal(la[1:7], lb[10:16])


def test_a_load_and_a_store_larger_than_the_buffer_move_in_chunks(instances):
    # Room for exactly 4 objects, 2 per lane: one per batch, 6 batches each way.
    a = instances(staging="always", staging_buffer_bytes=4 * OBJECT + OBJECT // 2)
    b = instances(staging="always", staging_buffer_bytes=4 * OBJECT)
    assert a.worker.io.batch == b.worker.io.batch == 1
    puts = fake_mooncake.cluster.calls.get("batch_put_from_multi_buffers", 0)
    a.serve_and_store(RequestView("r1", PROMPT), list(range(1, 8)))
    assert fake_mooncake.cluster.calls["batch_put_from_multi_buffers"] - puts == 6
    gets = fake_mooncake.cluster.calls.get("batch_get_into_multi_buffers", 0)
    n, out = _load(b, "r2", list(range(10, 17)))
    assert n == 6 * BS and not out.invalid_block_ids
    assert fake_mooncake.cluster.calls["batch_get_into_multi_buffers"] - gets == 6
    for la, lb in zip(a.kv, b.kv):
        assert torch.equal(la[1:7], lb[10:16])


def test_loads_and_stores_stage_through_slots_of_their_own(instances, monkeypatch):
    """The two lanes run at once: a store's gather must never land in slots a load is fetching
    into, verifying or scattering from (unverified bytes would reach the engine's blocks)."""
    named: dict[str, set[int]] = {"put": set(), "get": set()}
    cls = fake_mooncake.FakeMooncakeDistributedStore
    real_put, real_get = cls.batch_put_from_multi_buffers, cls.batch_get_into_multi_buffers

    def put(self, keys, all_buffer_ptrs, all_sizes, config=None):
        named["put"].update(p for ptrs in all_buffer_ptrs for p in ptrs)
        return real_put(self, keys, all_buffer_ptrs, all_sizes, config)

    def get(self, keys, all_buffer_ptrs, all_sizes, prefer_alloc_in_same_node=False):
        named["get"].update(p for ptrs in all_buffer_ptrs for p in ptrs)
        return real_get(self, keys, all_buffer_ptrs, all_sizes, prefer_alloc_in_same_node)

    monkeypatch.setattr(cls, "batch_put_from_multi_buffers", put)
    monkeypatch.setattr(cls, "batch_get_into_multi_buffers", get)
    a = instances()
    b = instances(staging="always", batch_objects=2)
    a.serve_and_store(RequestView("r1", PROMPT), list(range(1, 8)))
    b.serve_and_store(RequestView("s1", [t + 1 for t in PROMPT]), list(range(20, 27)))
    n, out = _load(b, "r2", list(range(10, 17)))
    assert n == 6 * BS and not out.invalid_block_ids
    st = b.worker.io.staging
    put, got = ({p for p in named[k] if st.ptr <= p < st.ptr + st.nbytes} for k in ("put", "get"))
    assert put and got and not put & got


@pytest.mark.parametrize("batch_objects", [32, 2])
def test_a_corrupt_object_is_never_written_into_the_engines_blocks(instances, batch_objects):
    a = instances(batch_objects=batch_objects)
    b = instances(staging="always", batch_objects=batch_objects)
    a.serve_and_store(RequestView("r1", PROMPT), list(range(1, 8)))
    target = _object_of(a, 4)  # the prefix's block 3
    data = bytearray(fake_mooncake.cluster.objects[target])
    data[-100] ^= 0x10  # a payload byte of the last layer
    fake_mooncake.cluster.objects[target] = bytes(data)
    blocks = list(range(10, 17))
    for layer in b.kv:
        layer[blocks[0] : blocks[-1] + 1] = SENTINEL
    n, out = _load(b, "r2", blocks)
    assert n == 6 * BS
    assert out.invalid_block_ids == set(blocks[3:6])
    for la, lb in zip(a.kv, b.kv):
        assert torch.equal(la[1:4], lb[10:13])
        assert bool((lb[13:16] == SENTINEL).all())  # the bad block and those after it: untouched
    assert target not in fake_mooncake.cluster.objects


def test_a_missing_object_mid_prefix_ends_the_staged_load_there(instances):
    a, b = instances(), instances(staging="always", batch_objects=2)
    a.serve_and_store(RequestView("r1", PROMPT), list(range(1, 8)))
    req = RequestView("r2", PROMPT)
    assert b.lookup(req) == (6 * BS, True)
    del fake_mooncake.cluster.objects[_object_of(a, 3)]  # the prefix's block 2, evicted after the lookup
    blocks = list(range(10, 17))
    for layer in b.kv:
        layer[blocks[0] : blocks[-1] + 1] = SENTINEL
    b.sched.update_state_after_alloc(req, (blocks,), 6 * BS)
    out = b.wait_for(lambda r: "r2" in r.finished_recving)
    assert out.invalid_block_ids == set(blocks[2:6])
    for la, lb in zip(a.kv, b.kv):
        assert torch.equal(la[1:3], lb[10:12])
        assert bool((lb[12:16] == SENTINEL).all())


@pytest.mark.parametrize("size", [0, -1])
def test_a_staging_buffer_of_no_bytes_is_a_config_error(master, size):
    with pytest.raises(ConfigError, match="staging_buffer_bytes"):
        make_instance(config(master, staging="always", staging_buffer_bytes=size))


def test_a_staging_buffer_smaller_than_four_objects_is_a_config_error(master):
    with pytest.raises(ConfigError, match=r"staging_buffer_bytes=.*at least 4"):
        make_instance(config(master, staging="always", staging_buffer_bytes=4 * OBJECT - 1))


def _meta_caches():
    t = torch.empty(8, 2, BS, 16, device="meta")
    return {"l0": (t, KVLayout.of_tensor(t, VLLM_CPU_DIMS))}


def test_staging_never_refuses_caches_that_are_not_host_memory(master):
    from kvconnect.api import EngineInfo
    from kvconnect.backends.mooncake import MooncakeWorker
    from tests.fakes.fake_mooncake import FakeMooncakeDistributedStore

    w = MooncakeWorker(config(master, staging="never"), EngineInfo("e", block_sizes=(BS,)),
                       store_factory=FakeMooncakeDistributedStore)
    try:
        with pytest.raises(LayoutError, match=r"staging='never'.*meta"):
            w.register_kv_caches(_meta_caches())
    finally:
        w.shutdown()


def test_staging_auto_stages_caches_that_are_not_host_memory(master):
    from kvconnect.api import EngineInfo
    from kvconnect.backends.mooncake import MooncakeWorker
    from tests.fakes.fake_mooncake import FakeMooncakeDistributedStore

    w = MooncakeWorker(config(master), EngineInfo("e", block_sizes=(BS,)),
                       store_factory=FakeMooncakeDistributedStore)
    try:
        w.register_kv_caches(_meta_caches())
        assert w.io.staging is not None and w.io.staging.device.type == "meta"
        assert w.io.staging.buffer.device.type == "cpu"
        assert w.io.staging.ptr in w._shared.store.buffers
    finally:
        w.shutdown()


def test_a_hybrid_model_on_staged_kv_is_refused_naming_why(master):
    from kvconnect.api import EngineInfo
    from kvconnect.backends.mooncake import MooncakeWorker
    from kvconnect.errors import UnsupportedModelError
    from tests.fakes.fake_mooncake import FakeMooncakeDistributedStore

    eng = EngineInfo("h", block_sizes=(BS, BS), model_signature={"arch": "tiny-hybrid"}, model_name="m",
                     group_kinds=("sliding_window", "full_attention"), sliding_windows=(2 * BS, 0),
                     null_block_id=0)
    w = MooncakeWorker(config(master, staging="always"), eng, store_factory=FakeMooncakeDistributedStore)
    kv = [torch.zeros(8, 2, BS, 16) for _ in range(2)]
    try:
        with pytest.raises(UnsupportedModelError, match="one KV-cache group"):
            w.register_kv_caches({f"g{g}.l{p}": (t, KVLayout.of_tensor(t, VLLM_CPU_DIMS, group=g))
                                  for g in range(2) for p, t in enumerate(kv)})
    finally:
        w.shutdown()


def test_a_staged_load_reported_at_its_deadline_never_writes_the_blocks_afterwards(instances):
    import threading

    a = instances()
    b = instances(staging="always", load_timeout_s=0.3)
    a.serve_and_store(RequestView("r1", PROMPT), list(range(1, 8)))
    req = RequestView("r2", PROMPT)
    assert b.lookup(req) == (6 * BS, True)
    gate = threading.Event()
    fake_mooncake.cluster.gate = gate  # the get hangs, as on a stopped memory holder
    blocks = list(range(10, 17))
    for layer in b.kv:
        layer[10:17] = SENTINEL
    b.sched.update_state_after_alloc(req, (blocks,), 6 * BS)
    out = b.wait_for(lambda r: "r2" in r.finished_recving, timeout_s=3.0)
    assert out.invalid_block_ids == set(blocks[:6])
    fake_mooncake.cluster.gate = None
    gate.set()  # the get returns good objects now, after the engine was told the load failed
    assert b.sched.request_finished(req, (blocks,))[0]
    b.wait_for(lambda r: "r2" in r.finished_sending)  # the job has returned
    for layer in b.kv:
        assert bool((layer[10:16] == SENTINEL).all())
