"""XXH3-64 (seed 0) of a memory range, for the stored objects' checksum.

Two bindings of the same function (XXH3's output is fixed by its specification since xxHash
0.8.0, so both give the same digest and instances using either share a store):

* the system ``libxxhash`` (0.8+; on Debian and Ubuntu a dependency of apt) through ctypes, which
  releases the GIL for the call. Preferred: the checksum runs on a helper thread next to the lane
  thread that drives the store, and a hash that holds the GIL makes that thread wait a switch
  interval (5 ms) each time it needs the GIL back; measured on this 2-core host, 11 ms per
  batch with the ``xxhash`` wheel against under 2 ms through ctypes;
* the ``xxhash`` wheel (``pip install 'kvconnect[mooncake]'``), which holds the GIL.

:data:`xxh3_64` is None when neither is present; :func:`require` then names the fix.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

from kvconnect.errors import BackendUnavailableError


def _system() -> Callable[[int, int], int] | None:
    name = ctypes.util.find_library("xxhash")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
        lib.XXH_versionNumber.restype = ctypes.c_uint
        if lib.XXH_versionNumber() < 800:  # XXH3 before 0.8.0 was not yet stable
            return None
        fn = lib.XXH3_64bits
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_uint64
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return fn


def _wheel() -> Callable[[int, int], int] | None:
    try:
        from xxhash import xxh3_64_intdigest
    except ImportError:
        return None
    return lambda ptr, n: xxh3_64_intdigest((ctypes.c_char * n).from_address(ptr))


system_xxh3_64 = _system()
wheel_xxh3_64 = _wheel()
#: ``xxh3_64(address, nbytes) -> int``, or None.
xxh3_64 = system_xxh3_64 or wheel_xxh3_64


def require() -> Callable[[int, int], int]:
    """The binding, or a BackendUnavailableError saying how to get one."""
    if xxh3_64 is None:
        raise BackendUnavailableError(
            "the mooncake shared tier checksums objects with XXH3: pip install "
            "'kvconnect[mooncake]' (the xxhash wheel) or apt-get install libxxhash0"
        )
    return xxh3_64
