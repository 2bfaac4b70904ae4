"""Prefix keys of the CPU offload tier: chained, salted, prefix-closed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvconnect.api import RequestView
from kvconnect.backends.cpu_offload.hashing import KeyCache, chain_keys, root_key

pytestmark = pytest.mark.unit

BS = 4


def keys_of(tokens, salt="", cache_salt=None, hashes=None):
    return KeyCache(salt, BS).keys(RequestView("r", tokens, cache_salt=cache_salt, block_hashes=hashes), 1000)


@given(
    st.lists(st.integers(0, 50_000), min_size=8, max_size=40), st.lists(st.integers(0, 50_000), max_size=12)
)
def test_keys_of_a_prefix_are_a_prefix_of_the_keys(prefix, suffix):
    a = keys_of(prefix)
    b = keys_of(prefix + suffix)
    assert b[: len(a)] == a


@given(st.lists(st.integers(0, 1000), min_size=8, max_size=24), st.integers(0, 7), st.integers(1, 1000))
def test_changing_one_token_changes_its_block_key_and_every_later_one(tokens, pos, delta):
    other = list(tokens)
    other[pos] += delta
    a, b = keys_of(tokens), keys_of(other)
    first = pos // BS
    assert a[:first] == b[:first]
    assert all(x != y for x, y in zip(a[first:], b[first:]))


def test_different_salts_never_share_keys():
    toks = list(range(16))
    base = set(keys_of(toks))
    assert base.isdisjoint(keys_of(toks, salt="tenant"))
    assert base.isdisjoint(keys_of(toks, cache_salt="lora-1"))
    assert set(keys_of(toks, cache_salt="lora-1")).isdisjoint(keys_of(toks, cache_salt="lora-2"))


def test_engine_block_hashes_are_used_and_salted():
    hashes = [b"h1", b"h2"]
    a = keys_of(list(range(8)), hashes=hashes)
    b = keys_of(list(range(100, 108)), hashes=hashes)  # tokens ignored when the engine hashes
    assert a == b and len(a) == 2
    assert set(a).isdisjoint(keys_of(list(range(8)), salt="x", hashes=hashes))


def test_only_full_blocks_get_keys():
    assert len(keys_of(list(range(11)))) == 2


def test_key_cache_extends_as_request_grows():
    kc = KeyCache("", BS)
    toks = list(range(8))
    view = RequestView("r", toks, all_token_ids=toks)
    assert len(kc.keys(view, 10)) == 2
    toks.extend(range(8, 12))
    assert kc.keys(view, 10) == chain_keys(toks, BS, root_key("", None, BS))


def test_block_size_is_part_of_the_chain():
    assert root_key("", None, 16) != root_key("", None, 32)
