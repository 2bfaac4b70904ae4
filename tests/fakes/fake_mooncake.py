"""FakeMooncakeDistributedStore: the methods of ``mooncake.store.MooncakeDistributedStore`` that
kvconnect calls, same names, argument names and return conventions, over an in-process dict that
every instance shares (as every client of one master shares its objects).

Return conventions held to the real store by tests/integration/test_mooncake_contract.py:
``setup`` 0 / -1; ``batch_is_exist`` 1 / 0 per key; ``batch_put_from_multi_buffers`` 0 per key
(also for a key that exists already, whose object is kept); ``batch_get_into_multi_buffers`` the
bytes read, -704 for a missing key, -600 when the buffers are smaller than the object, -800 when
larger; ``batch_remove`` 0 per key; ``remove_by_regex`` the number of objects removed. While ``cluster.down``
is set every call answers -900 (the master cannot be reached); ``cluster.full`` makes puts answer -200;
``cluster.put_code`` forces a code on every put (-800: another metadata mode); ``cluster.gate`` (an Event),
when set to an unset Event, holds every get until it is set (a stopped memory holder).
"""

from __future__ import annotations

import ctypes
import re
import threading
from dataclasses import dataclass, field
from typing import Any

NO_AVAILABLE_HANDLE = -200
BUFFER_TOO_SMALL = -600
OBJECT_NOT_FOUND = -704
TRANSFER_FAIL = -800
RPC_FAIL = -900


@dataclass
class FakeCluster:
    objects: dict[str, bytes] = field(default_factory=dict)
    down: bool = False
    full: bool = False
    put_code: int = 0
    gate: threading.Event | None = None
    calls: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        self.objects.clear()
        self.down = self.full = False
        self.put_code = 0
        self.gate = None
        self.calls.clear()

    def count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1


cluster = FakeCluster()


class FakeMooncakeDistributedStore:
    def __init__(self) -> None:
        self._setup = False
        self.buffers: dict[int, int] = {}

    def setup(self, local_hostname: str, metadata_server: str, global_segment_size: int,
              local_buffer_size: int, protocol: str, rdma_devices: str, master_server_addr: str,
              engine: Any = None, enable_ssd_offload: bool = False, ssd_offload_path: str = "",
              tenant_id: str = "default", enable_client_http_server: bool = False,
              client_http_port: int = 9300) -> int:
        cluster.count("setup")
        if cluster.down:
            return -1
        self._setup = True
        return 0

    def register_buffer(self, buffer_ptr: int, size: int) -> int:
        self.buffers[buffer_ptr] = size
        return 0

    def unregister_buffer(self, buffer_ptr: int) -> int:
        return 0 if self.buffers.pop(buffer_ptr, None) is not None else -1

    def health_check(self) -> int:
        return 2 if cluster.down else (0 if self._setup else 1)

    def batch_is_exist(self, keys: list[str]) -> list[int]:
        cluster.count("batch_is_exist")
        if cluster.down:
            return [RPC_FAIL] * len(keys)
        with cluster.lock:
            return [1 if k in cluster.objects else 0 for k in keys]

    def batch_put_from_multi_buffers(self, keys: list[str], all_buffer_ptrs: list[list[int]],
                                     all_sizes: list[list[int]], config: Any = None) -> list[int]:
        cluster.count("batch_put_from_multi_buffers")
        out = []
        for key, ptrs, sizes in zip(keys, all_buffer_ptrs, all_sizes):
            if cluster.down:
                out.append(RPC_FAIL)
            elif cluster.put_code:
                out.append(cluster.put_code)
            elif cluster.full:
                out.append(NO_AVAILABLE_HANDLE)
            else:
                data = b"".join(ctypes.string_at(p, n) for p, n in zip(ptrs, sizes))
                with cluster.lock:
                    cluster.objects.setdefault(key, data)
                out.append(0)
        return out

    def batch_get_into_multi_buffers(self, keys: list[str], all_buffer_ptrs: list[list[int]],
                                     all_sizes: list[list[int]],
                                     prefer_alloc_in_same_node: bool = False) -> list[int]:
        cluster.count("batch_get_into_multi_buffers")
        gate = cluster.gate
        if gate is not None:
            gate.wait()
        out = []
        for key, ptrs, sizes in zip(keys, all_buffer_ptrs, all_sizes):
            if cluster.down:
                out.append(RPC_FAIL)
                continue
            with cluster.lock:
                data = cluster.objects.get(key)
            total = sum(sizes)
            if data is None:
                out.append(OBJECT_NOT_FOUND)
            elif total < len(data):
                out.append(BUFFER_TOO_SMALL)
            elif total > len(data):
                out.append(TRANSFER_FAIL)
            else:
                off = 0
                for p, n in zip(ptrs, sizes):
                    ctypes.memmove(p, data[off : off + n], n)
                    off += n
                out.append(total)
        return out

    def batch_remove(self, keys: list[str], force: bool = False) -> list[int]:
        if cluster.down:
            return [RPC_FAIL] * len(keys)
        with cluster.lock:
            return [0 if cluster.objects.pop(k, None) is not None else OBJECT_NOT_FOUND for k in keys]

    def remove_by_regex(self, regex_pattern: str, force: bool = False) -> int:
        if cluster.down:
            return RPC_FAIL
        rx = re.compile(regex_pattern)
        with cluster.lock:
            gone = [k for k in cluster.objects if rx.search(k)]
            for k in gone:
                del cluster.objects[k]
        return len(gone)

    def close(self) -> int:
        self._setup = False
        return 0
