"""The connection to a Mooncake Store: checked set-up, one client per process, health.

``MooncakeDistributedStore.setup`` against an unreachable master blocks for about 90 s before it
fails (measured, 0.3.13), and a client whose metadata mode differs from the store's memory
holders sets up fine but fails every transfer. So :func:`connect` checks what it can before and
after ``setup``, within ``connect_timeout_s``, and turns each failure into a :class:`ConfigError`
naming the field:

* the master's RPC port accepts a TCP connection (``master_server_address``);
* an HTTP metadata server answers (``metadata_server``);
* ``setup`` returns 0 in time;
* a 4 KiB probe object can be put and read back: a transfer failure there means the memory
  holders use another metadata mode (``metadata_server``); no space means the store has no
  memory at all (``global_segment_size``: give this process some, or start a memory holder).

After start the store may go away and come back (Mooncake's client reconnects to a restarted
master by itself, measured in about 3 s): :class:`StoreHealth` turns failed calls into a short
back-off during which callers skip the store instead of waiting on it.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvconnect.config import MooncakeConfig, validate_mooncake
from kvconnect.errors import BackendUnavailableError, ConfigError

logger = logging.getLogger(__name__)

#: Mooncake error codes seen in practice (``mooncake-transfer-engine`` 0.3.13).
NO_AVAILABLE_HANDLE = -200  # the store has no room for the object
BUFFER_TOO_SMALL = -600
OBJECT_NOT_FOUND = -704
TRANSFER_FAIL = -800
RPC_FAIL = -900  # the master did not answer


def load_store_class() -> Callable[[], Any]:
    try:
        from mooncake.store import MooncakeDistributedStore
    except ImportError as e:
        raise BackendUnavailableError(
            "the mooncake backend needs Mooncake Store: pip install 'kvconnect[mooncake]' "
            f"(and the system library libibverbs1: apt-get install libibverbs1); import failed: {e}"
        ) from e
    return MooncakeDistributedStore


def _replicate_config(replica_num: int) -> Any:
    try:
        from mooncake.store import ReplicateConfig
    except ImportError:
        return None
    rc = ReplicateConfig()
    rc.replica_num = replica_num
    return rc


def _check_master(cfg: MooncakeConfig, deadline: float) -> None:
    host, _, port = cfg.master_server_address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=max(0.1, deadline - time.monotonic())):
            pass
    except OSError as e:
        raise ConfigError(
            f"mooncake.master_server_address: no Mooncake master answers at "
            f"{cfg.master_server_address} ({e})"
        ) from e


def _check_metadata(cfg: MooncakeConfig, deadline: float) -> None:
    if not cfg.metadata_server.startswith("http://"):
        return
    url = cfg.metadata_server + ("&" if "?" in cfg.metadata_server else "?") + "key=kvconnect-probe"
    try:
        urllib.request.urlopen(url, timeout=max(0.1, deadline - time.monotonic())).close()
    except urllib.error.HTTPError:
        return  # it answered (404 for an unknown key): the server is there
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"mooncake.metadata_server: no HTTP metadata server answers at {cfg.metadata_server} "
            f"({e}); start the master with --enable_http_metadata_server or use P2PHANDSHAKE"
        ) from e


def _call_with_deadline(fn: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Run a blocking library call on a daemon thread and wait at most ``timeout_s`` for it."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised on the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, name=f"kvc-mooncake-{what}", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise TimeoutError(f"{what} did not return within {timeout_s:.1f} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _probe(store: Any, cfg: MooncakeConfig, deadline: float) -> None:
    """Put a small object and read it back: the only way to see a metadata-mode mismatch."""
    buf = np.arange(4096, dtype=np.uint8)
    ptr = buf.ctypes.data
    key = f"kvc1/probe/{uuid.uuid4().hex}"
    left = lambda: max(0.1, deadline - time.monotonic())  # noqa: E731
    _call_with_deadline(lambda: store.register_buffer(ptr, buf.nbytes), left(), "register_buffer")
    try:
        put = _call_with_deadline(
            lambda: store.batch_put_from_multi_buffers([key], [[ptr]], [[buf.nbytes]],
                                                       _replicate_config(1)),
            left(), "probe put",
        )[0]
        if put == TRANSFER_FAIL:
            raise ConfigError(
                f"mooncake.metadata_server={cfg.metadata_server!r}: the master answers but a probe "
                "object could not be written (transfer failed): the store's memory holders use "
                "another metadata mode; every party must use the same one"
            )
        if put == NO_AVAILABLE_HANDLE:
            raise ConfigError(
                f"mooncake.global_segment_size={cfg.global_segment_size}: the store has no memory "
                "to hold objects; start a memory holder (mooncake_client --global_segment_size=...) "
                "or give this process global_segment_size > 0"
            )
        if put != 0:
            logger.warning("mooncake: probe put returned %d; the store may be degraded", put)
            return
        out = np.zeros_like(buf)
        _call_with_deadline(lambda: store.register_buffer(out.ctypes.data, out.nbytes), left(),
                            "register_buffer")
        got = _call_with_deadline(
            lambda: store.batch_get_into_multi_buffers([key], [[out.ctypes.data]], [[out.nbytes]]),
            left(), "probe get",
        )[0]
        if got != buf.nbytes or not np.array_equal(out, buf):
            raise ConfigError(
                f"mooncake.metadata_server={cfg.metadata_server!r}: a probe object was written but "
                f"not read back (get returned {got}); check that every party uses the same "
                "metadata mode and that the memory holders are reachable"
            )
        store.unregister_buffer(out.ctypes.data)
    finally:
        store.unregister_buffer(ptr)
        try:
            store.batch_remove([key], True)
        except Exception:  # best effort: the probe key is tiny
            logger.debug("mooncake: removing the probe object failed", exc_info=True)


def connect(cfg: MooncakeConfig, store_factory: Callable[[], Any] | None = None) -> Any:
    """A set-up store client, or a ConfigError naming the field at fault (never a long hang)."""
    validate_mooncake(cfg)
    factory = store_factory or load_store_class()
    deadline = time.monotonic() + cfg.connect_timeout_s
    _check_master(cfg, deadline)
    _check_metadata(cfg, deadline)
    store = factory()
    try:
        rc = _call_with_deadline(
            lambda: store.setup(cfg.local_hostname, cfg.metadata_server, cfg.global_segment_size,
                                cfg.local_buffer_size, cfg.protocol, cfg.rdma_devices,
                                cfg.master_server_address),
            max(0.1, deadline - time.monotonic()), "setup",
        )
    except TimeoutError as e:
        raise ConfigError(
            f"mooncake.master_server_address: set-up with the master at {cfg.master_server_address} "
            f"did not finish within connect_timeout_s={cfg.connect_timeout_s}"
        ) from e
    if rc != 0:
        raise ConfigError(
            f"mooncake: set-up failed (code {rc}) with master_server_address="
            f"{cfg.master_server_address!r}, metadata_server={cfg.metadata_server!r}, "
            f"local_hostname={cfg.local_hostname!r}, protocol={cfg.protocol!r}"
        )
    try:
        _probe(store, cfg, deadline)
    except TimeoutError as e:
        raise ConfigError(
            f"mooncake.master_server_address: the store at {cfg.master_server_address} did not "
            f"answer a probe within connect_timeout_s={cfg.connect_timeout_s}"
        ) from e
    logger.info("mooncake: connected to master %s (metadata %s, %s)", cfg.master_server_address,
                cfg.metadata_server, cfg.protocol)
    return store


@dataclass
class StoreHealth:
    """Failed calls open a back-off window during which the store is skipped (lookups miss,
    stores are dropped); the first call after it tries the store again."""

    retry_interval_s: float
    down_until: float = 0.0
    failures: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def usable(self) -> bool:
        return time.monotonic() >= self.down_until

    def failed(self, why: str) -> None:
        with self._lock:
            first = self.usable()
            self.failures += 1
            self.down_until = time.monotonic() + self.retry_interval_s
        if first:
            logger.warning("mooncake: store unavailable (%s); skipping it for %.1f s", why,
                           self.retry_interval_s)

    def ok(self) -> None:
        if self.down_until:
            with self._lock:
                if self.down_until:
                    logger.info("mooncake: store reachable again")
                self.down_until = 0.0


@dataclass
class SharedStore:
    """One set-up client per process and store, shared by the scheduler and worker halves when
    they run in one process, with its registered memory ranges."""

    store: Any
    health: StoreHealth
    replicate: Any
    registered: set[tuple[int, int]] = field(default_factory=set)
    users: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def register(self, ptr: int, size: int) -> None:
        with self.lock:
            if (ptr, size) in self.registered:
                return
            rc = self.store.register_buffer(ptr, size)
            if rc != 0:
                raise ConfigError(f"mooncake: registering {size} bytes of KV memory failed (code {rc})")
            self.registered.add((ptr, size))


_shared: dict[tuple, SharedStore] = {}
_shared_lock = threading.Lock()


def shared_store(cfg: MooncakeConfig, store_factory: Callable[[], Any] | None = None) -> SharedStore:
    key = (cfg.master_server_address, cfg.metadata_server, cfg.local_hostname, cfg.protocol,
           cfg.rdma_devices, cfg.global_segment_size, id(store_factory) if store_factory else None)
    with _shared_lock:
        sh = _shared.get(key)
        if sh is None:
            sh = _shared[key] = SharedStore(
                connect(cfg, store_factory), StoreHealth(cfg.retry_interval_s),
                _replicate_config(cfg.replica_num),
            )
        sh.users += 1
        return sh


def release_store(sh: SharedStore) -> None:
    with _shared_lock:
        sh.users -= 1
        if sh.users > 0:
            return
        for k, v in list(_shared.items()):
            if v is sh:
                del _shared[k]
    for ptr, _ in list(sh.registered):
        try:
            sh.store.unregister_buffer(ptr)
        except Exception:
            logger.debug("mooncake: unregister_buffer failed", exc_info=True)
    try:
        sh.store.close()
    except Exception:
        logger.debug("mooncake: close failed", exc_info=True)
