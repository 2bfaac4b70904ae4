"""Test-only stand-in for ``torchvision`` (never installed, never shipped).

PyPI's torchvision is CUDA-linked and breaks on a CPU-only torch, yet SGLang's config modules
(and transformers' image utilities they pull in) import ``torchvision`` submodules at module
level for vision models the kvconnect tests never run. This package answers every
``torchvision.*`` import with an inert module whose attributes are placeholders; using one
raises. ``tests.sglang_stubs.import_sglang`` puts it on ``sys.path`` only while it imports
SGLang, then takes it off again so no other test sees it.
"""

import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+kvconnect-test-stub"
KVCONNECT_TEST_STUB = True


class _Inert:
    """Stands for any torchvision object: attribute access and subclassing work, use raises."""

    def __init__(self, name: str = "torchvision") -> None:
        self._name = name

    def __getattr__(self, attr: str) -> "_Inert":
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Inert(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} is a kvconnect test stand-in and cannot be used")

    def __mro_entries__(self, bases):
        return (object,)


def _module_getattr(modname: str):
    def __getattr__(attr: str) -> _Inert:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Inert(f"{modname}.{attr}")

    return __getattr__


class _SubmoduleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers ``torchvision.<anything>`` with an inert package module."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = types.ModuleType(spec.name)
        mod.__path__ = []
        mod.__getattr__ = _module_getattr(spec.name)
        return mod

    def exec_module(self, module):
        return None


FINDER = _SubmoduleFinder()
if not any(isinstance(f, _SubmoduleFinder) for f in sys.meta_path):
    sys.meta_path.append(FINDER)

__getattr__ = _module_getattr(__name__)
