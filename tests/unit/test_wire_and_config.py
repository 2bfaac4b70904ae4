import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvconnect.config import CpuOffloadConfig, NixlConfig, parse_config
from kvconnect.errors import ConfigError, WireError
from kvconnect.metadata import (
    HandshakeMetadata,
    LayerRegion,
    block_groups,
    compat_hash,
    decode,
    encode,
    parse_transfer_params,
)

pytestmark = pytest.mark.unit


def _meta(**kw):
    base = dict(
        engine_id="e0",
        tp_rank=0,
        tp_size=1,
        compat_hash="abc",
        block_sizes=(16,),
        layers=(
            LayerRegion(
                name="l0", base_addr=4096, dims=("block", "token", "feature"), shape=(4, 16, 8),
                strides=(128, 8, 1), itemsize=2, dtype="bfloat16",
            ),
        ),
        transport="nixl",
        transport_metadata=b"\x00agent",
        agent_name="a0",
    )
    base.update(kw)
    return HandshakeMetadata(**base)


# -- wire ------------------------------------------------------------------------------------------
def test_handshake_metadata_round_trips():
    m = _meta()
    assert decode(encode(m), HandshakeMetadata, what="handshake") == m


def test_wrong_type_names_the_field():
    raw = msgspec.msgpack.decode(encode(_meta()))
    raw["tp_rank"] = "zero"
    with pytest.raises(WireError, match=r"tp_rank"):
        decode(msgspec.msgpack.encode(raw), HandshakeMetadata, what="handshake")


def test_missing_field_names_the_field():
    raw = msgspec.msgpack.decode(encode(_meta()))
    del raw["compat_hash"]
    with pytest.raises(WireError, match="compat_hash"):
        decode(msgspec.msgpack.encode(raw), HandshakeMetadata, what="handshake")


def test_unknown_field_in_handshake_is_refused():
    raw = msgspec.msgpack.decode(encode(_meta()))
    raw["surprise"] = 1
    with pytest.raises(WireError, match="surprise"):
        decode(msgspec.msgpack.encode(raw), HandshakeMetadata, what="handshake")


def test_oversize_message_is_refused_before_decoding():
    with pytest.raises(WireError, match="exceeds"):
        decode(b"\x00" * 101, HandshakeMetadata, what="handshake", max_bytes=100)


def test_garbage_bytes_are_a_wire_error():
    with pytest.raises(WireError, match="handshake"):
        decode(b"\xc1\xff garbage", HandshakeMetadata, what="handshake")
    with pytest.raises(WireError, match="expected bytes"):
        decode("text", HandshakeMetadata, what="handshake")  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_ever_raise_wire_error(data):
    try:
        decode(data, HandshakeMetadata, what="handshake")
    except WireError:
        pass


def test_compat_hash_ignores_key_order_and_sees_every_value():
    a = compat_hash({"layers": 2, "heads": 8, "dtype": "bf16"})
    assert a == compat_hash({"dtype": "bf16", "heads": 8, "layers": 2})
    assert a != compat_hash({"layers": 2, "heads": 8, "dtype": "fp16"})
    assert a != compat_hash({"layers": 3, "heads": 8, "dtype": "bf16"})


# -- transfer params ---------------------------------------------------------------------------------
def test_vllm_style_transfer_params_parse_and_ignore_unknown_keys():
    p = parse_transfer_params(
        {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": "p0",
            "remote_block_ids": [1, 2, 3],
            "remote_host": "127.0.0.1",
            "remote_port": 5600,
            "remote_request_id": "r1",
            "tp_size": 1,
            "router_extra": {"x": 1},
        }
    )
    assert p.do_remote_prefill and p.remote_block_ids == [1, 2, 3] and p.remote_port == 5600
    assert parse_transfer_params(None) is None


@pytest.mark.parametrize(
    "params,field",
    [
        (
            {"do_remote_prefill": True, "remote_engine_id": "p", "remote_block_ids": [1], "remote_host": "h"},
            "remote_port",
        ),
        (
            {
                "do_remote_prefill": True,
                "remote_engine_id": "p",
                "remote_block_ids": "1,2",
                "remote_host": "h",
                "remote_port": 1,
            },
            "remote_block_ids",
        ),
        (
            {
                "do_remote_prefill": True,
                "remote_engine_id": "p",
                "remote_block_ids": [1],
                "remote_host": "h",
                "remote_port": 70000,
            },
            "remote_port",
        ),
        ({"do_remote_decode": "yes"}, "do_remote_decode"),
        ({"tp_size": 1.5}, "tp_size"),
    ],
)
def test_malformed_transfer_params_name_the_field(params, field):
    with pytest.raises(WireError, match=field):
        parse_transfer_params(params)


def test_transfer_params_must_be_an_object():
    with pytest.raises(WireError, match="expected an object"):
        parse_transfer_params([1, 2])  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["do_remote_prefill", "remote_block_ids", "remote_port", "tp_size", "x"]),
        st.one_of(
            st.none(), st.booleans(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=3)
        ),
    )
)
def test_fuzzed_transfer_params_only_raise_wire_error(params):
    try:
        parse_transfer_params(params)
    except WireError:
        pass


def test_block_groups_normalises_flat_and_nested():
    assert block_groups([1, 2]) == ([1, 2],)
    assert block_groups([[1], [2, 3]]) == ([1], [2, 3])
    assert block_groups(None) == ([],)


# -- config ------------------------------------------------------------------------------------------
def test_single_backend_shorthand_and_list_form_parse():
    one = parse_config({"backend": "nixl", "mode": "push"})
    assert isinstance(one.backends[0], NixlConfig) and one.backends[0].mode == "push"
    two = parse_config(
        {"backends": [{"backend": "nixl"}, {"backend": "cpu_offload", "cpu_bytes_to_use": 4e9}]}
    )
    assert two.names == ["nixl", "cpu_offload"]
    assert isinstance(two.backends[1], CpuOffloadConfig) and two.backends[1].cpu_bytes_to_use == 4_000_000_000


@pytest.mark.parametrize(
    "raw,msg",
    [
        ({"backend": "nixl", "mdoe": "pull"}, "unknown config key 'mdoe'.*did you mean 'mode'"),
        (
            {"backends": [{"backend": "cpu_offload", "cpu_byte_to_use": 1}]},
            "cpu_byte_to_use.*cpu_bytes_to_use",
        ),
        ({"backend": "nixel"}, "unknown backend 'nixel'.*did you mean 'nixl'"),
        ({"backend": "cpu_offload", "cpu_bytes_to_use": 0}, "cpu_bytes_to_use must be > 0"),
        ({"backend": "cpu_offload", "cpu_bytes_to_use": -5}, "cpu_bytes_to_use must be > 0"),
        ({"backend": "cpu_offload"}, "cpu_bytes_to_use"),
        ({"backend": "cpu_offload", "cpu_bytes_to_use": 10, "eviction_policy": "fifo"}, "eviction_policy"),
        ({"backend": "nixl", "transfer_timeout_s": 0}, "transfer_timeout_s must be > 0"),
        ({"backends": [{"backend": "nixl"}, {"backend": "mori"}]}, "both P/D transfer backends"),
        ({"backends": []}, "empty"),
        ({}, "needs a config"),
        ({"backend": "nixl", "backends": []}, "both 'backend' and 'backends'"),
        ({"bakend": "nixl"}, "did you mean 'backend'"),
    ],
)
def test_bad_config_is_a_clear_error(raw, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_config(raw)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["backend", "backends", "mode", "cpu_bytes_to_use", "zz"]),
                       st.one_of(st.none(), st.integers(), st.text(max_size=8), st.booleans(),
                                 st.lists(st.dictionaries(st.sampled_from(["backend", "mode"]),
                                                          st.sampled_from(["nixl", "pull", 3]), max_size=2),
                                          max_size=2)), max_size=3))
def test_fuzzed_config_only_raises_config_error(raw):
    try:
        parse_config(raw)
    except ConfigError:
        pass


def test_mapped_errors_keep_their_cause():
    """kvconnect's own errors name what was wrong; the library error behind them stays in the traceback."""
    import msgspec

    from kvconnect.config import parse_config
    from kvconnect.errors import ConfigError, WireError
    from kvconnect.metadata import HandshakeMetadata, decode

    with pytest.raises(WireError) as wire:
        decode(b"\xc1garbage", HandshakeMetadata, what="handshake metadata")
    assert isinstance(wire.value.__cause__, msgspec.DecodeError)
    with pytest.raises(ConfigError) as conf:
        parse_config({"backend": "nixl", "handshake_timeout_s": "soon"})
    assert isinstance(conf.value.__cause__, msgspec.ValidationError)
