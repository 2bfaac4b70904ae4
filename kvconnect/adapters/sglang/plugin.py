"""SGLang general-plugin entry point (group ``sglang.srt.plugins``, name ``kvconnect``).

SGLang calls :func:`register` early in every one of its processes (launcher, tokenizer manager,
schedulers, detokenizer), before it parses arguments, then applies the hooks registered here.
Nothing in SGLang is patched on disk; three runtime registrations make
``--disaggregation-transfer-backend kvconnect`` work:

1. ``kvconnect`` is added to the CLI choices (``add_disagg_transfer_backend_choices``), so SGLang's
   own argument parser accepts it;
2. ``TransferBackend`` (a closed enum that every process builds from the CLI string) gains a
   ``KVCONNECT`` member with value ``"kvconnect"``;
3. an ``AROUND`` hook on ``sglang.srt.disaggregation.utils.get_kv_class`` answers that member with
   kvconnect's Manager / Sender / Receiver / BootstrapServer and passes every other backend through.

The HiCache storage backend needs no registration: SGLang's ``dynamic`` storage backend imports
the class named in ``--hicache-storage-backend-extra-config`` (see :mod:`.hicache`).

Importing this module is cheap (no SGLang, torch or NIXL import); set ``SGLANG_PLUGINS`` to a
list without ``kvconnect`` to keep SGLang from loading it.
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import Any

logger = logging.getLogger(__name__)

#: The value users pass to ``--disaggregation-transfer-backend``.
BACKEND_NAME = "kvconnect"
#: The ``TransferBackend`` member name added for it.
MEMBER_NAME = "KVCONNECT"
GET_KV_CLASS = "sglang.srt.disaggregation.utils.get_kv_class"

_registered = False


def register() -> None:
    """Make ``kvconnect`` a SGLang P/D transfer backend in this process (idempotent)."""
    global _registered
    if _registered:
        return
    from sglang.srt.arg_groups.choices import (
        DISAGG_TRANSFER_BACKEND_CHOICES,
        add_disagg_transfer_backend_choices,
    )
    from sglang.srt.disaggregation.utils import TransferBackend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType, _current_plugin_source

    if BACKEND_NAME not in DISAGG_TRANSFER_BACKEND_CHOICES:
        add_disagg_transfer_backend_choices([BACKEND_NAME])
    add_enum_member(TransferBackend, MEMBER_NAME, BACKEND_NAME)
    HookRegistry.register(GET_KV_CLASS, get_kv_class_around, HookType.AROUND)
    if _current_plugin_source.get() is None:
        # Called directly rather than from SGLang's load_plugins(), which applies hooks itself
        # after every plugin ran (applying early would shut out later plugins' hooks).
        HookRegistry.apply_hooks()
    _registered = True
    logger.debug("kvconnect registered as SGLang transfer backend %r", BACKEND_NAME)


def add_enum_member(enum_cls: type[Enum], name: str, value: Any) -> Enum:
    """Add a member to an existing Enum class; returns the member (the existing one when the
    value is already there). ``enum_cls(value)``, ``enum_cls[name]``, ``enum_cls.NAME``,
    iteration and equality then all treat it like a declared member."""
    existing = enum_cls._value2member_map_.get(value)
    if existing is not None:
        return existing
    if name in enum_cls._member_map_:
        raise ValueError(f"{enum_cls.__name__} already has a member named {name!r} with another value")
    member = object.__new__(enum_cls)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls  # type: ignore[attr-defined]
    # type.__setattr__: EnumType.__setattr__ refuses to bind names that look like members.
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_names_.append(name)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    return member


def get_kv_class_around(original, transfer_backend, class_type):
    """The ``AROUND`` hook on ``get_kv_class``: kvconnect's classes for ``kvconnect``."""
    if getattr(transfer_backend, "value", transfer_backend) != BACKEND_NAME:
        return original(transfer_backend, class_type)
    from sglang.srt.disaggregation.utils import KVClassType

    if class_type == KVClassType.KVARGS:
        return original(transfer_backend, class_type)  # every backend shares SGLang's KVArgs
    from kvconnect.adapters.sglang import conn

    mapping = {
        KVClassType.MANAGER: conn.KVConnectKVManager,
        KVClassType.SENDER: conn.KVConnectKVSender,
        KVClassType.RECEIVER: conn.KVConnectKVReceiver,
        KVClassType.BOOTSTRAP_SERVER: conn.KVConnectKVBootstrapServer,
    }
    try:
        return mapping[class_type]
    except KeyError:
        raise ValueError(f"kvconnect has no SGLang class of type {class_type!r}") from None
