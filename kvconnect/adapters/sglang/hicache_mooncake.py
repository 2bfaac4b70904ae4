"""HiCache storage on the shared tier (``"kvconnect": {"backend": "mooncake", ...}``): pages one
SGLang instance stored are read by every instance of the deployment, on any node.

* **Objects.** One object per page of one rank: the page's pieces in the host pool's order (what
  ``get_page_buffer_meta`` lists: K and V of every layer) followed by the 40-byte header of
  :mod:`kvconnect.backends.mooncake.objects` (size, 64-bit checksum, layout and key digests).
  Puts and gets name the host pool's own memory, registered with the store when SGLang hands the
  pool over, so no byte is copied on this side.
* **Keys.** ``kvc1/<namespace>/<layout>/<n>.<r>/<SGLang page hash>`` (:mod:`..mooncake.keys`, as
  for vLLM): the namespace digests the model (or the config's ``namespace``), the host pool's
  KV shape and dtype, page size, pipeline stage and ``hash_salt``; ``<n>.<r>`` is the TP split
  (MLA: the DCP split, as MLA's KV is the same on every TP rank and only the writer rank stores).
  SGLang's page hashes already carry the prefix chain, cache salt and LoRA.
* **Verified.** ``batch_get_v1`` reports a page loaded only when Mooncake returned exactly
  ``page + header`` bytes, the header fits this namespace's page and key, and the checksum of
  the bytes that landed in the host pool equals the stored one. The first page that fails ends
  the load there (SGLang uses the leading run); a corrupt object is removed.
* **A store that is down or slow.** Existence queries (``batch_exists``, and the one before each
  put batch, so that stored pages are not sent again) run on a helper thread and count as a miss
  past ``lookup_timeout_s``; puts and gets run on SGLang's own storage threads in batches of
  ``batch_objects``, and no batch starts past ``store_timeout_s`` / ``load_timeout_s``. A
  batch in flight is waited for: SGLang frees the pages of a failed get once the call returns,
  and a late write must never land in pages it has handed to someone else (Mooncake ends a call
  to a dead master in about 4 s). A failed call opens the store's back-off
  (``retry_interval_s``): meanwhile lookups miss, sets return False and gets fail at once. Nothing
  raises into SGLang; every outcome is counted (``stats``).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

from kvconnect.adapters.sglang.hicache_base import KVConnectHiCacheBase
from kvconnect.api import EngineInfo
from kvconnect.backends.mooncake import keys as ks
from kvconnect.backends.mooncake import objects as ob
from kvconnect.backends.mooncake.store import (
    BUFFER_TOO_SMALL,
    OBJECT_NOT_FOUND,
    RPC_FAIL,
    TRANSFER_FAIL,
    SharedStore,
    release_store,
    shared_store,
)
from kvconnect.config import MooncakeConfig, validate_mooncake
from kvconnect.errors import ConfigError

logger = logging.getLogger(__name__)

_POOL_FACTS = (
    "layout",
    "layer_num",
    "head_num",
    "head_dim",
    "kv_cache_dim",
    "kv_lora_rank",
    "qk_rope_head_dim",
)


def key_prefix(
    cfg: MooncakeConfig, sc: HiCacheStorageConfig, pool: Any, piece_sizes: tuple[int, ...]
) -> tuple[str, bytes]:
    """This rank's object-key prefix and layout digest, from what makes its page bytes differ."""
    facts = {k: getattr(pool, k) for k in _POOL_FACTS if isinstance(getattr(pool, k, None), (int, str))}
    signature = {"engine": "sglang", "mla": bool(sc.is_mla_model), "dtype": str(pool.dtype),
                 "pp": f"{sc.pp_rank}/{sc.pp_size}", **facts}
    if sc.attn_cp_size > 1:
        signature["cp"] = f"{sc.attn_cp_rank}/{sc.attn_cp_size}"
    if sc.is_mla_model:
        n, r = sc.dcp_size, sc.dcp_rank
    else:
        n, r = sc.tp_size, sc.tp_rank
    engine = EngineInfo("sglang", tp_size=n, tp_rank=r, block_sizes=(int(pool.page_size),),
                        model_signature=signature, model_name=sc.model_name or "")
    layout = ks.layout_digest(("sglang-host-pool", str(pool.dtype), int(pool.page_size), piece_sizes))
    return ks.rank_prefix(ks.namespace(cfg, engine), layout, n, r), layout


def _pool_tensors(pool: Any) -> list[torch.Tensor]:
    out = []
    for name in ("kv_buffer", "k_buffer", "v_buffer"):
        v = getattr(pool, name, None)
        for t in v if isinstance(v, (list, tuple)) else [v]:
            if isinstance(t, torch.Tensor) and all(t.data_ptr() != o.data_ptr() for o in out):
                out.append(t)
    return out


def header_key(page_hash: str) -> bytes:
    return hashlib.blake2b(page_hash.encode(), digest_size=8).digest()


class MooncakeHiCacheStorage(KVConnectHiCacheBase):
    COUNTERS = ("lookups", "lookup_pages", "hit_pages", "lookups_skipped", "lookup_timeouts",
                "set_pages", "set_bytes", "objects_present", "put_failures", "sets_dropped",
                "get_pages", "get_bytes", "objects_missing", "objects_corrupt", "get_failures",
                "gets_skipped", "deadline_misses", "errors")

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict | None = None) -> None:
        super().__init__(storage_config, kwargs)
        if not isinstance(self.cfg, MooncakeConfig):
            raise ConfigError(
                f"MooncakeHiCacheStorage runs the 'mooncake' backend, got {type(self.cfg).__name__}"
            )
        validate_mooncake(self.cfg, "kvconnect.mooncake")
        if not (storage_config.extra_config or {}).get("interface_v1"):
            raise ConfigError(
                'the kvconnect mooncake HiCache storage moves pages zero-copy: add "interface_v1": 1 '
                "to --hicache-storage-backend-extra-config"
            )
        self._shared: SharedStore | None = shared_store(self.cfg, (kwargs or {}).get("store_factory"))
        self.store = self._shared.store
        self.health = self._shared.health
        self._helper = ThreadPoolExecutor(2, thread_name_prefix="kvc-hicache-mooncake")
        self.prefix: str | None = None
        self.layout = b""
        # set: two batches' headers (one being put while the next one's checksums are computed)
        self._headers = {
            "get": ob.HeaderPool(self.cfg.batch_objects),
            "set": ob.HeaderPool(2 * self.cfg.batch_objects),
        }
        self._checksummer = ThreadPoolExecutor(1, thread_name_prefix="kvc-hicache-crc")
        self._header_locks = {k: threading.Lock() for k in ("get", "set")}
        for hp in self._headers.values():
            self._shared.register(hp.base, hp.nbytes)

    # -- set-up -------------------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        tensors = _pool_tensors(mem_pool_host)
        if not tensors:
            raise ConfigError(
                "kvconnect mooncake HiCache storage: the host pool has no kv_buffer to register"
            )
        ranges = [(t.data_ptr(), t.numel() * t.element_size()) for t in tensors]
        ps = int(mem_pool_host.page_size)
        for page in {0, int(mem_pool_host.size) // ps - 1}:
            idx = torch.arange(page * ps, (page + 1) * ps, dtype=torch.int64)
            ptrs, sizes = mem_pool_host.get_page_buffer_meta(idx)
            for a, n in zip(ptrs, sizes):
                if not any(p <= a and a + n <= p + s for p, s in ranges):
                    raise ConfigError("kvconnect mooncake HiCache storage: host pool pages lie outside its "
                                      "buffers (kv_buffer / k_buffer / v_buffer); cannot register them")
        for p, s in ranges:
            self._shared.register(p, s)  # type: ignore[union-attr]
        _, sizes = mem_pool_host.get_page_buffer_meta(torch.arange(ps, dtype=torch.int64))
        self.prefix, self.layout = key_prefix(self.cfg, self.storage_config, mem_pool_host,
                                              tuple(int(s) for s in sizes))
        logger.info("kvconnect HiCache storage on Mooncake: pages of %d bytes, keys %s<page hash>",
                    self.page_bytes, self.prefix)
        if self.storage_config.should_split_heads:
            logger.info("kvconnect HiCache storage on Mooncake: pages are keyed per TP split (heads are not "
                        "split further); instances with another TP size do not share them")

    def object_key(self, page_hash: str) -> str:
        return f"{self.prefix}{page_hash}"

    def _down(self, codes: list[int], what: str) -> bool:
        """Whether the codes say the store is unreachable (opens its back-off)."""
        if any(c in (RPC_FAIL, TRANSFER_FAIL) for c in codes):
            self.health.failed(f"{what} returned {sorted(set(codes))[:3]}")
            return True
        return False

    # -- lookup ---------------------------------------------------------------------------------------
    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        """Leading pages stored, from one batched existence query; 0 when the store cannot say in time."""
        if not keys or self.prefix is None:
            return 0
        self.counters.add(lookups=1, lookup_pages=len(keys))
        if not self.health.usable():
            self.counters.add(lookups_skipped=1)
            return 0
        flags = self._query([self.object_key(k) for k in keys])
        if flags is None:
            return 0
        n = next((i for i, f in enumerate(flags) if f != 1), len(flags))
        if any(f < 0 for f in flags):
            self.health.failed(f"batch_is_exist returned {min(flags)}")
        else:
            self.health.ok()
        self.counters.add(hit_pages=n)
        return n

    def _query(self, okeys: list[str]) -> list[int] | None:
        """``batch_is_exist`` on a helper thread, or None (back-off opened) when it raised or gave
        no answer within ``lookup_timeout_s``: the query touches no pages, so it can be left behind."""
        try:
            fut = self._helper.submit(self.store.batch_is_exist, okeys)
        except RuntimeError:  # closed
            return None
        try:
            return list(fut.result(timeout=self.cfg.lookup_timeout_s))
        except TimeoutError:
            fut.cancel()  # if it never started (both helpers stuck), it never will
            self.counters.add(lookup_timeouts=1)
            self.health.failed(
                f"batch_is_exist gave no answer within lookup_timeout_s={self.cfg.lookup_timeout_s}"
            )
        except Exception as e:
            self.counters.add(errors=1)
            self.health.failed(f"batch_is_exist raised {type(e).__name__}: {e}")
        return None

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    # -- set --------------------------------------------------------------------------------------------
    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        ok = [False] * len(keys)
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        t0 = time.perf_counter()
        try:
            stored = self._set(list(first), first, host_indices, keys, ok)
        except Exception:
            logger.exception("kvconnect mooncake HiCache: batch_set_v1 of %d pages failed", len(keys))
            self.counters.add(errors=1)
            stored = 0
        for i, k in enumerate(keys):  # a key repeated in one batch shares its first copy's fate
            ok[i] = ok[first[k]]
        self._record("backup", stored, t0)
        return ok

    def _set(self, uniq: list[str], first: dict[str, int], host_indices: torch.Tensor, keys: list[str],
             ok: list[bool]) -> int:
        """One existence query for the call, then puts of the missing pages, ``batch_objects`` a call."""
        if not uniq:
            return 0
        if self.prefix is None or not self.health.usable():
            self.counters.add(sets_dropped=len(uniq))
            return 0
        pieces = self._page_pieces(keys, host_indices)
        deadline = time.monotonic() + self.cfg.store_timeout_s
        exist = self._query([self.object_key(k) for k in uniq])
        if exist is None or any(e < 0 for e in exist):
            if exist is not None:
                self.health.failed(f"batch_is_exist returned {min(exist)}")
            self.counters.add(sets_dropped=len(uniq))
            return 0
        missing = []
        for k, e in zip(uniq, exist):
            if e == 1:
                ok[first[k]] = True
            else:
                missing.append(k)
        self.counters.add(objects_present=len(uniq) - len(missing))
        stored = 0
        B = self.cfg.batch_objects
        chunks = [missing[lo : lo + B] for lo in range(0, len(missing), B)]
        with self._header_locks["set"]:
            nxt = self._checksummer.submit(self._prepare_put, chunks[0], pieces, first, 0) if chunks else None
            for n, chunk in enumerate(chunks):
                ptrs, sizes = nxt.result()  # type: ignore[union-attr]
                nxt = None
                if time.monotonic() > deadline:
                    self.counters.add(deadline_misses=1, sets_dropped=len(missing) - n * B)
                    break
                if n + 1 < len(chunks):  # checksums of the next batch while this one is put
                    nxt = self._checksummer.submit(
                        self._prepare_put, chunks[n + 1], pieces, first, (n + 1) % 2
                    )
                codes = list(self.store.batch_put_from_multi_buffers(
                    [self.object_key(k) for k in chunk], ptrs, sizes, self._shared.replicate))  # type: ignore[union-attr]
                good = [k for k, c in zip(chunk, codes) if c == 0]
                for k in good:
                    ok[first[k]] = True
                stored += len(good)
                self.counters.add(
                    set_pages=len(good), set_bytes=len(good) * (self.page_bytes + ob.HEADER_BYTES)
                )
                bad = [c for c in codes if c != 0]
                if not bad:
                    self.health.ok()
                    continue
                self.counters.add(put_failures=len(bad))
                if self._down(bad, "batch_put_from_multi_buffers"):
                    self.counters.add(sets_dropped=max(0, len(missing) - (n + 1) * B))
                    break
            if nxt is not None:
                nxt.result()  # never leave the checksummer writing headers the next call reuses
        return stored

    def _prepare_put(self, chunk: list[str], pieces: list[list[tuple[int, int]]], first: dict[str, int],
                     half: int) -> tuple[list[list[int]], list[list[int]]]:
        """Buffers of one put batch: each page's pieces and its header (checksum computed here)."""
        hp, base = self._headers["set"], half * self.cfg.batch_objects
        ptrs, sizes = [], []
        for j, k in enumerate(chunk):
            p = [int(a) for a, _ in pieces[first[k]]]
            n = [int(b) for _, b in pieces[first[k]]]
            ob.pack_header(
                hp.array[base + j], self.page_bytes, ob.checksum_of(p, n), self.layout, header_key(k)
            )
            ptrs.append(p + [hp.ptr(base + j)])
            sizes.append(n + [ob.HEADER_BYTES])
        return ptrs, sizes

    # -- get --------------------------------------------------------------------------------------------
    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        t0 = time.perf_counter()
        try:
            good = self._get(keys, host_indices)
        except Exception:
            logger.exception("kvconnect mooncake HiCache: batch_get_v1 of %d pages failed", len(keys))
            self.counters.add(errors=1)
            good = 0
        self._record("prefetch", good, t0)
        return [True] * good + [False] * (len(keys) - good)

    def _get(self, keys: list[str], host_indices: torch.Tensor) -> int:
        if not keys:
            return 0
        if self.prefix is None or not self.health.usable():
            self.counters.add(gets_skipped=1)
            return 0
        pieces = self._page_pieces(keys, host_indices)
        deadline = time.monotonic() + self.cfg.load_timeout_s
        hp = self._headers["get"]
        want = self.page_bytes + ob.HEADER_BYTES
        good = 0
        with self._header_locks["get"]:
            for lo in range(0, len(keys), self.cfg.batch_objects):
                if time.monotonic() > deadline:
                    self.counters.add(deadline_misses=1)
                    break
                chunk = keys[lo : lo + self.cfg.batch_objects]
                ptrs = [[int(a) for a, _ in pieces[lo + j]] + [hp.ptr(j)] for j in range(len(chunk))]
                sizes = [[int(n) for _, n in pieces[lo + j]] + [ob.HEADER_BYTES] for j in range(len(chunk))]
                got = list(
                    self.store.batch_get_into_multi_buffers([self.object_key(k) for k in chunk], ptrs, sizes)
                )
                for j, n in enumerate(got):
                    why = self._verify(chunk[j], n, want, hp.array[j], ptrs[j][:-1], sizes[j][:-1])
                    if why:
                        if why != "missing":
                            logger.warning("kvconnect mooncake HiCache: page %d of %d (%s): %s", lo + j,
                                           len(keys), chunk[j], why)
                        self.counters.add(get_pages=good, get_bytes=good * want)
                        return good
                    good += 1
                self.health.ok()
        self.counters.add(get_pages=good, get_bytes=good * want)
        return good

    def _verify(self, key: str, n: int, want: int, header: Any, ptrs: list[int], sizes: list[int]) -> str:
        """Why the object that landed for ``key`` cannot be used, or "" when it is verified."""
        if n == OBJECT_NOT_FOUND:
            self.counters.add(objects_missing=1)
            return "missing"
        if n < 0 and n != BUFFER_TOO_SMALL:
            self.counters.add(get_failures=1)
            self._down([n], "batch_get_into_multi_buffers")
            return f"get failed (code {n})"
        if n == BUFFER_TOO_SMALL:
            why = f"object larger than a page and header ({want} bytes)"
        else:
            why = f"object of {n} bytes, a page and header are {want}" if n != want else ""
        if not why:
            crc, why = ob.check_header(header, self.page_bytes, self.layout, header_key(key))
            if crc is not None and ob.checksum_of(ptrs, sizes) != crc:
                why = "checksum mismatch"
        if why:
            self.counters.add(objects_corrupt=1)
            try:
                self.store.batch_remove([self.object_key(key)], True)
            except Exception:
                logger.debug("kvconnect mooncake HiCache: removing a bad object failed", exc_info=True)
        return why

    # -- the rest of SGLang's interface -----------------------------------------------------------------
    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> torch.Tensor | None:
        return None  # interface_v1 is required (checked at start): SGLang calls batch_get_v1

    def batch_get(
        self, keys: list[str], target_locations: Any = None, target_sizes: Any = None
    ) -> list[torch.Tensor | None]:
        return [None] * len(keys)

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        return False

    def batch_set(
        self, keys: list[str], values: Any = None, target_locations: Any = None, target_sizes: Any = None
    ) -> bool:
        return False

    def clear(self) -> None:
        """Remove this rank's objects of this namespace (other deployments' objects stay)."""
        if self.prefix is None:
            return
        try:
            fut = self._helper.submit(self.store.remove_by_regex, "^" + re.escape(self.prefix) + ".*", True)
            logger.info(
                "kvconnect mooncake HiCache: clear removed %s objects",
                fut.result(timeout=self.cfg.store_timeout_s),
            )
        except Exception as e:
            logger.warning("kvconnect mooncake HiCache: clear failed: %s", e)

    def close(self) -> None:
        sh, self._shared = self._shared, None
        if sh is not None:
            self.prefix = None  # later calls miss instead of reaching a closed client
            self._helper.shutdown(wait=False)
            self._checksummer.shutdown(wait=False)
            release_store(sh)
