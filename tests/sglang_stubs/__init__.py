"""Test-only helpers for importing SGLang on a CPU-only machine.

SGLang's config modules import ``torchvision`` at module level; PyPI's torchvision is CUDA-linked
and is not installed here. :func:`import_sglang` puts a stand-in (``stubpath/torchvision``) on
``sys.path`` only while it imports the SGLang modules the tests need, then removes it and drops
the stand-in from ``sys.modules``, so no other test (vLLM's, transformers') ever sees it.
A real torchvision, when importable, is used as is.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings

STUB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stubpath")

#: The SGLang modules kvconnect's tests use (imported in this order).
MODULES = (
    "sglang.srt.server_args",
    "sglang.srt.disaggregation.utils",
    "sglang.srt.disaggregation.common.conn",
    "sglang.srt.plugins",
    "sglang.srt.mem_cache.hicache_storage",
    "sglang.srt.mem_cache.storage.backend_factory",
)


def _real_torchvision() -> bool:
    if "torchvision" in sys.modules:
        return not getattr(sys.modules["torchvision"], "KVCONNECT_TEST_STUB", False)
    return importlib.util.find_spec("torchvision") is not None


def import_sglang(modules=MODULES) -> dict:
    """Import SGLang modules (stand-in torchvision only if needed); returns them by name.
    Raises ImportError when SGLang itself is not installed."""
    importlib.import_module("sglang")  # the ImportError a skip should report
    use_stub = not _real_torchvision()
    if use_stub:
        sys.path.insert(0, STUB_PATH)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {m: importlib.import_module(m) for m in modules}
    finally:
        if use_stub:
            try:
                sys.path.remove(STUB_PATH)
            except ValueError:
                pass
            for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
                del sys.modules[name]
            stub_finders = [f for f in sys.meta_path if type(f).__name__ == "_SubmoduleFinder"]
            for f in stub_finders:
                sys.meta_path.remove(f)
