"""Object keys of the shared tier.

One object holds one engine block of one TP rank (every layer of it; on a hybrid model, every
layer of one KV-cache group). Its key is::

    kvc1/<namespace>/<layout>/<tp_size>.<rank>/<block key>

* ``namespace``: a digest of everything about the deployment that makes KV bytes differ and that
  both halves know from the engine: the model (its path, or the config's ``namespace``), the
  model signature (architecture, layers, KV heads, head size, dtype), the block size and the
  config's ``hash_salt``.
* ``layout``: a digest of the rank's KV layout (dimension order, shapes of one block, dtype,
  bytes), published by each worker in its handshake: instances whose caches are laid out
  differently (a CPU and a GPU instance, other attention back ends) never read each other's
  objects, and the object header carries it again for the load to check.
* ``<tp_size>.<rank>``: the rank's share of the KV heads.
* ``block key``: the chained prefix hash of the block (:mod:`kvconnect.backends.cpu_offload.hashing`,
  shared with the host tier), folded with the namespace, the request's cache salt and the block
  size, and with the KV-cache group for groups other than 0 (``cpu_offload.groups.group_key``);
  when the engine supplies its own block hashes (vLLM), they carry LoRA adapters and multimodal
  inputs too. vLLM's hashes are the same on every instance with its default
  (sha256) prefix-caching hash; with a non-cryptographic one, give every instance the same
  ``PYTHONHASHSEED`` or instances will not share (they stay correct).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from kvconnect.api import EngineInfo
from kvconnect.config import MooncakeConfig

PREFIX = "kvc1"


def namespace(cfg: MooncakeConfig, engine: EngineInfo) -> str:
    ident = {
        "model": cfg.namespace or engine.model_name,
        "signature": {k: v for k, v in engine.model_signature.items() if k != "kv_bytes_per_block"},
        "block_size": engine.block_size,
        "salt": cfg.hash_salt,
    }
    raw = json.dumps(ident, sort_keys=True, default=str).encode()
    return hashlib.blake2b(raw, digest_size=8).hexdigest()


def layout_digest(parts: Sequence[Any]) -> bytes:
    """8 bytes naming a rank's KV layout (anything repr-able and stable)."""
    return hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()


def rank_prefix(ns: str, layout: bytes, tp_size: int, rank: int) -> str:
    return f"{PREFIX}/{ns}/{layout.hex()}/{tp_size}.{rank}/"


def object_keys(prefix: str, block_keys: Sequence[bytes]) -> list[str]:
    return [prefix + k.hex() for k in block_keys]


def prefixes_by_rank(ns: str, layouts: Mapping[int, bytes], tp_size: int) -> list[str] | None:
    """One key prefix per TP rank, or None until every rank's layout is known."""
    if len(layouts) < tp_size or any(r not in layouts for r in range(tp_size)):
        return None
    return [rank_prefix(ns, layouts[r], tp_size, r) for r in range(tp_size)]
