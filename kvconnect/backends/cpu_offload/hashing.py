"""Prefix keys: chained hashes of full blocks.

The key of block ``i`` depends on every token of blocks ``0..i`` and on the salts, so a run of
matching keys is always a prefix match, and requests with different salts (the config's
``hash_salt``, the request's ``cache_salt``) never share a key. When the engine supplies its own
chained block hashes (vLLM does) they are used instead of hashing tokens again, folded with the
salt root so the tier's salt still isolates.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from kvconnect.api import RequestView
from kvconnect.backends.cpu_offload.groups import group_key

KEY_BYTES = 16
_DOMAIN = b"kvconnect/cpu_offload/v1"


def _h(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    for p in parts:
        h.update(p)
    return h.digest()


def _field(s: str) -> bytes:
    b = s.encode()
    return len(b).to_bytes(4, "little") + b


def root_key(hash_salt: str, cache_salt: str | None, block_size: int) -> bytes:
    """The chain's seed: different salts or block sizes give unrelated chains."""
    return _h(_DOMAIN, _field(hash_salt), _field(cache_salt or ""), block_size.to_bytes(4, "little"))


def chain_keys(
    token_ids: Sequence[int], block_size: int, root: bytes, prev: bytes | None = None, start: int = 0,
    stop: int | None = None,
) -> list[bytes]:
    """Keys of full blocks ``start..stop`` of ``token_ids``; ``prev`` is the key of block
    ``start - 1`` (or None for the root)."""
    n_full = len(token_ids) // block_size
    stop = n_full if stop is None else min(stop, n_full)
    if stop <= start:
        return []
    toks = np.asarray(token_ids[start * block_size : stop * block_size], dtype=np.int64)
    raw = toks.tobytes()
    step = block_size * 8
    key = root if prev is None else prev
    out = []
    for i in range(stop - start):
        key = _h(key, raw[i * step : (i + 1) * step])
        out.append(key)
    return out


class RequestKeys:
    """The keys of one request, computed once and extended as the request grows."""

    __slots__ = ("root", "keys", "_engine", "groups")

    def __init__(self, root: bytes) -> None:
        self.root = root
        self.keys: list[bytes] = []
        self._engine: bool | None = None
        #: Per-group keys of KV-cache groups other than 0 (hybrid models), extended like ``keys``.
        self.groups: dict[int, list[bytes]] = {}

    def upto(self, view: RequestView, n_blocks: int, block_size: int) -> list[bytes]:
        """The first ``min(n_blocks, available)`` keys; O(new blocks) after the first call."""
        if len(self.keys) < n_blocks:
            if view.block_hashes is not None and self._engine is not False:
                self._engine = True
                hs = view.block_hashes
                for h in hs[len(self.keys) : n_blocks]:
                    self.keys.append(_h(self.root, h if isinstance(h, bytes) else repr(h).encode()))
            elif self._engine is not True:
                self._engine = False
                toks = view.all_token_ids if view.all_token_ids is not None else view.prompt_token_ids
                prev = self.keys[-1] if self.keys else None
                self.keys.extend(
                    chain_keys(toks, block_size, self.root, prev, start=len(self.keys), stop=n_blocks)
                )
        return self.keys[:n_blocks] if len(self.keys) > n_blocks else self.keys


class KeyCache:
    """Per-request :class:`RequestKeys`, bounded so that requests the engine never finishes
    cannot grow it without limit."""

    def __init__(self, hash_salt: str, block_size: int, capacity: int = 16384) -> None:
        self.hash_salt = hash_salt
        self.block_size = block_size
        self.capacity = capacity
        self._roots: dict[str | None, bytes] = {}
        self._reqs: OrderedDict[str, RequestKeys] = OrderedDict()

    def keys(self, view: RequestView, n_blocks: int) -> list[bytes]:
        rk = self._reqs.get(view.request_id)
        if rk is None:
            root = self._roots.get(view.cache_salt)
            if root is None:
                if len(self._roots) > 4096:
                    self._roots.clear()
                root = self._roots[view.cache_salt] = root_key(
                    self.hash_salt, view.cache_salt, self.block_size
                )
            rk = self._reqs[view.request_id] = RequestKeys(root)
            if len(self._reqs) > self.capacity:
                self._reqs.popitem(last=False)
        else:
            self._reqs.move_to_end(view.request_id)
        return rk.upto(view, n_blocks, self.block_size)

    def group_keys(self, view: RequestView, n_blocks: int, group: int) -> list[bytes]:
        """Keys of group ``group``'s first ``min(n_blocks, available)`` blocks (see
        :func:`kvconnect.backends.cpu_offload.groups.group_key`); memoised like :meth:`keys`."""
        keys = self.keys(view, n_blocks)
        if group == 0:
            return keys
        rk = self._reqs[view.request_id]
        mine = rk.groups.setdefault(group, [])
        if len(mine) < len(keys):
            mine.extend(group_key(k, group) for k in keys[len(mine) :])
        return mine[: len(keys)] if len(mine) > len(keys) else mine

    def forget(self, request_id: str) -> None:
        self._reqs.pop(request_id, None)
