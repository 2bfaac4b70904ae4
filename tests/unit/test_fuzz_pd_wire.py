"""Fuzzing (hypothesis) of everything the P/D core decodes from outside: notifications, push
write requests, checksum messages, handshake metadata, side-channel frames sent to a worker's real
listener, and router transfer params through the P/D scheduler. Only the documented errors come
out (WireError / HandshakeError / ConfigError), never another exception, and nothing hangs; what
is accepted is well-formed: within its bounds, and it round-trips to the same value."""

from __future__ import annotations

import time

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvconnect.api import EngineInfo, RequestView, StepView
from kvconnect.config import NixlConfig
from kvconnect.errors import ConfigError, HandshakeError, WireError
from kvconnect.handshake import Request, SideChannelClient, Signed, zmq_endpoint
from kvconnect.metadata import HandshakeMetadata, decode, encode
from kvconnect.pd import wire as W
from kvconnect.pd.params import resolve_load
from kvconnect.pd.progress import decode_write_request
from kvconnect.pd.scheduler import PDScheduler
from tests.fakes import fake_nixl
from tests.unit.pd_harness import Engine, decode_start, prefill, run_until

pytestmark = pytest.mark.unit
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                    st.text(max_size=20), st.binary(max_size=20))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=5),
                                                   st.dictionaries(st.text(max_size=10), c, max_size=5)),
                      max_leaves=20)
_mp_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True),
                        st.text(max_size=20), st.binary(max_size=20))
#: msgpack-encodable values
mp_values = st.recursive(
    _mp_scalars,
    lambda c: st.one_of(st.lists(c, max_size=5), st.dictionaries(st.text(max_size=10), c, max_size=5)),
    max_leaves=20,
)


def _valid_notice_bytes() -> st.SearchStrategy[bytes]:
    return st.builds(lambda k, r, t, n: W.encode_notice(W.Notice(k, r, t, n)),
                     st.sampled_from(sorted(W.NOTICE_KINDS) + ["x"]), st.text(max_size=8),
                     st.integers(-3, 9), st.integers(-3, 9))


@FAST
@given(st.one_of(st.binary(max_size=200), _valid_notice_bytes(),
                 st.builds(lambda v: b"kvc1" + msgspec.msgpack.encode(v), mp_values)))
def test_notices_only_raise_wire_error(data):
    try:
        n = W.decode_notice(data)
    except WireError:
        return
    assert n.kind in W.NOTICE_KINDS and 0 <= n.rank < n.tp_size
    assert W.decode_notice(W.encode_notice(n)) == n


def _mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.integers(0, len(valid)).map(lambda i: valid[:i]),  # truncated
        st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)).map(
            lambda t: valid[: t[0]] + bytes([t[1]]) + valid[t[0] + 1:]),  # one byte changed
        st.binary(max_size=300),
        mp_values.map(msgspec.msgpack.encode),
    )


_WRITE = encode(W.WriteRequest(producer_request_id="p", consumer_request_id="d", consumer_engine_id="e",
                               consumer_host="127.0.0.1", consumer_port=5600, consumer_tp_size=2,
                               consumer_rank=1, block_ids=((1, 2), ), token_start=0, token_end=32))
_SUMS = encode(W.ChecksumReply(heads=2, tables=(b"\x01" * 32,)))


_WRITE_FIELDS = msgspec.msgpack.decode(_WRITE)
small_ints = st.integers(-2, 6) | st.sampled_from([0, 65535, 65536, 2**31])
#: Well-typed write requests with small, often out-of-range numbers: where bounds checks bite.
near_valid_writes = st.builds(
    lambda port, tp, rank, t0, t1, ids: msgspec.msgpack.encode(
        {
            **_WRITE_FIELDS,
            "consumer_port": port,
            "consumer_tp_size": tp,
            "consumer_rank": rank,
            "token_start": t0,
            "token_end": t1,
            "block_ids": ids,
        }
    ),
    small_ints,
    small_ints,
    small_ints,
    small_ints,
    small_ints,
    st.lists(st.lists(small_ints, max_size=3), max_size=2),
)


@FAST
@given(st.one_of(_mutations(_WRITE), near_valid_writes))
def test_write_requests_only_raise_wire_error(data):
    try:
        wr = decode_write_request(data)
    except WireError:
        return
    assert 0 < wr.consumer_port < 65536 and 0 <= wr.consumer_rank < wr.consumer_tp_size
    assert 0 <= wr.token_start <= wr.token_end
    assert all(b >= 0 for group in wr.block_ids for b in group)
    assert decode_write_request(encode(wr)) == wr


@FAST
@given(_mutations(_SUMS))
def test_checksum_replies_only_raise_wire_error(data):
    try:
        r = W.decode_checksum_reply(data)
    except WireError:
        return
    assert r.heads > 0 and all(len(t) % (8 * r.heads) == 0 for t in r.tables)
    assert W.decode_checksum_reply(encode(r)) == r


@FAST
@given(mp_values)
def test_handshake_metadata_from_any_msgpack_only_raises_wire_error(v):
    try:
        md = decode(msgspec.msgpack.encode(v), HandshakeMetadata, what="handshake metadata")
    except WireError:
        return
    _assert_well_formed_metadata(md)


def _assert_well_formed_metadata(md: HandshakeMetadata) -> None:
    assert 0 <= md.tp_rank < md.tp_size and all(b > 0 for b in md.block_sizes)
    for layer in md.layers:
        assert len(layer.dims) == len(layer.shape) == len(layer.strides)
        assert (
            layer.itemsize > 0
            and layer.base_addr >= 0
            and layer.group >= 0
            and min(layer.shape, default=0) >= 0
        )
    assert decode(encode(md), HandshakeMetadata, what="handshake metadata") == md


_METADATA = {
    "engine_id": "p",
    "tp_rank": 0,
    "tp_size": 2,
    "compat_hash": "h",
    "block_sizes": [16],
    "layers": [
        {
            "name": "l0",
            "base_addr": 4096,
            "dims": ["block", "token", "x"],
            "shape": [4, 16, 8],
            "strides": [128, 8, 1],
            "itemsize": 2,
            "dtype": "bfloat16",
        }
    ],
    "transport": "nixl",
    "transport_metadata": b"md",
    "agent_name": "a",
}
_LAYER_KEYS = list(_METADATA["layers"][0])


@FAST
@given(st.one_of(
    st.builds(lambda k, v: {**_METADATA, k: v}, st.sampled_from(list(_METADATA)), mp_values),
    st.builds(lambda k, v: {**_METADATA, "layers": [{**_METADATA["layers"][0], k: v}]},
              st.sampled_from(_LAYER_KEYS), mp_values),
    st.builds(lambda r, s, b: {**_METADATA, "tp_rank": r, "tp_size": s, "block_sizes": b},
              st.integers(-3, 5), st.integers(-3, 5), st.lists(st.integers(-2, 64), max_size=3)),
))
def test_handshake_metadata_near_valid_is_accepted_only_when_well_formed(v):
    try:
        md = decode(msgspec.msgpack.encode(v), HandshakeMetadata, what="handshake metadata")
    except WireError as e:
        assert str(e).startswith("handshake metadata:")
        return
    _assert_well_formed_metadata(md)


# -- router transfer params through the P/D scheduler ---------------------------------------------
_ENGINE = EngineInfo(engine_id="d", block_sizes=(16,))
_KEYS = ["do_remote_prefill", "do_remote_decode", "remote_engine_id", "remote_block_ids", "remote_host",
         "remote_port", "remote_request_id", "tp_size", "remote_block_size", "kvconnect_mode"]
_GOOD = {"do_remote_prefill": True, "remote_engine_id": "p", "remote_block_ids": [1, 2, 3],
         "remote_host": "127.0.0.1", "remote_port": 5600, "remote_request_id": "p1", "tp_size": 1}
params = st.one_of(
    st.dictionaries(st.sampled_from(_KEYS + ["other"]), values, max_size=8),
    st.builds(lambda k, v: {**_GOOD, k: v}, st.sampled_from(_KEYS), values),
    values,
)


@FAST
@given(params, st.integers(0, 50), st.sampled_from(["length", "stop", "abort", None]))
def test_p_d_scheduler_never_raises_on_router_params(p, prompt_len, reason):
    s = PDScheduler(NixlConfig(), _ENGINE)
    req = RequestView("r", list(range(prompt_len)), transfer_params=p if isinstance(p, dict) else None)
    n, _ = s.get_num_new_matched_tokens(req, 0)
    s.update_state_after_alloc(req, [[5, 6, 7, 8]], n or 0)
    meta = s.build_step_metadata(StepView())
    assert isinstance(meta, W.PDStepMetadata)
    for load in meta.loads:  # the worker's check passes only well-formed loads, or names the field
        try:
            spec = resolve_load(load, _ENGINE.block_sizes, "pull")
        except WireError as e:
            assert str(e).startswith("kv_transfer_params:")
            continue
        block_size = p.get("remote_block_size") or 16  # the params' own size, else this engine's
        assert spec.token_end <= len(spec.remote_block_ids[0]) * block_size and spec.remote.tp_size > 0
        assert 0 < spec.remote.port < 65536 and spec.remote_request_id and spec.mode in ("pull", "push")
    req.finish_reason = reason
    s.request_finished(req, [[5, 6, 7, 8]])
    s.build_step_metadata(StepView())


_TIMEOUT_KEYS = ["handshake_timeout_s", "transfer_timeout_s", "lease_timeout_s", "poll_interval_s",
                 "idle_poll_interval_s"]


@FAST
@given(
    st.one_of(
        st.dictionaries(
            st.sampled_from(list(NixlConfig.__struct_fields__) + ["backend", "nope"]), values, max_size=6
        ),
        st.dictionaries(
            st.sampled_from(_TIMEOUT_KEYS + ["side_channel_port"]),
            st.floats(allow_nan=True, allow_infinity=True) | st.integers(-5, 70000),
            max_size=3,
        ),
    )
)
def test_p_d_config_dicts_only_raise_config_error(raw):
    from kvconnect.config import parse_config
    try:
        cfg = parse_config({"backend": "nixl", **{k: v for k, v in raw.items() if k != "backend"}})
    except ConfigError:
        return
    (b,) = cfg.backends
    for key in _TIMEOUT_KEYS:
        assert 0 < getattr(b, key) < float("inf"), key  # every wait keeps a deadline
    assert 0 <= b.side_channel_port < 65536
    assert parse_config(msgspec.to_builtins(b)).backends == (b,)


# -- a worker's real listener ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def worker_pair():
    P = Engine("fuzz-prefill", options={"verify_checksums": True})
    D = Engine("fuzz-decode", options={"verify_checksums": True})
    yield P, D
    P.shutdown()
    D.shutdown()
    fake_nixl.registry.reset()


frames = st.one_of(
    st.binary(max_size=300),
    mp_values.map(msgspec.msgpack.encode),
    st.builds(lambda k, b: encode(Signed(encode(Request(k, b"n" * 12, b)))),
              st.sampled_from(["metadata", "write", "checksums", "x"]),
              st.one_of(st.binary(max_size=100), _mutations(_WRITE), mp_values.map(msgspec.msgpack.encode))),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(frames, min_size=1, max_size=5))
def test_worker_listener_survives_any_frames_and_keeps_serving(worker_pair, batch):
    P, _ = worker_pair
    port = P.workers[0].port
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(zmq_endpoint("127.0.0.1", port))
    for f in batch:
        raw.send(f)
    raw.close()
    c = SideChannelClient()
    try:  # still answers, within its deadline
        assert c.request("127.0.0.1", port, "metadata", timeout_s=5) == P.workers[0]._md_bytes
        with pytest.raises(HandshakeError):
            c.request(
                "127.0.0.1", port, "checksums", encode(W.ChecksumRequest(request_id="none")), timeout_s=5
            )
    finally:
        c.close()


def test_after_the_fuzzing_the_worker_pair_still_moves_kv(worker_pair):
    P, D = worker_pair
    P.fill(3)
    t0 = time.monotonic()
    _, p = prefill(P, "p-after", 40, [[1, 2, 3]])
    decode_start(D, "d-after", 40, p, [[4, 5, 6]])
    assert run_until([P, D], lambda: "d-after" in D.recving and "p-after" in P.sending, 5.0)
    assert "d-after" not in D.failed
    assert time.monotonic() - t0 < 5.0
