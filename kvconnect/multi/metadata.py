"""What the MultiConnector's scheduler half hands its worker half each step, and child naming.

The per-step metadata carries, besides one entry per child, the two facts the worker half needs
to count completions per child and that only the scheduler knows:

* ``deferred`` — for each request finished since the last step whose blocks some children asked
  to keep (``delay_free``), *which* children asked. The worker reports the request in
  ``finished_sending`` only once every one of them has reported it.
* ``loads`` — for each load the engine accepted since the last step, which child owns it, whether
  it is asynchronous, and the engine block ids it fills. The worker reports ``finished_recving``
  only from the owner, and when the owner fails (or already failed on the scheduler side) it
  reports those blocks invalid so the engine's load-failure policy applies.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import msgspec

from kvconnect.config import PD_BACKENDS
from kvconnect.errors import ConfigError, UnsupportedModelError
from kvconnect.multi.hybrid import fit_to_model

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: Separates a repeated backend name from its occurrence number: ``cpu_offload#2``.
NAME_SUFFIX_SEP = "#"


class LoadNote(msgspec.Struct, frozen=True, kw_only=True):
    """One accepted external load, as the worker half must know it."""

    #: Index of the owning child.
    child: int
    #: The engine waits for ``finished_recving`` (True) or uses the blocks after the step (False).
    is_async: bool
    #: Engine block ids that the load fills (all groups together).
    blocks: tuple[int, ...] = ()
    #: The owner could not take the load (it raised): report it failed at once.
    failed: bool = False


class MultiStepMetadata(msgspec.Struct, frozen=True, kw_only=True):
    """One step's metadata for a MultiWorker."""

    #: One entry per child, in child order (a child's own metadata; None when it built none).
    children: tuple[Any, ...]
    #: request id -> indices of the children that deferred freeing its blocks.
    deferred: dict[str, tuple[int, ...]] = {}
    #: request id -> the load accepted for it in this step.
    loads: dict[str, LoadNote] = {}
    #: Children whose scheduler half failed to build metadata: they sit this step out.
    skipped: tuple[int, ...] = ()


def child_names(base_names: Sequence[str]) -> list[str]:
    """Name children by backend; a name used more than once is numbered in order
    (``["nixl", "cpu_offload", "cpu_offload"]`` -> ``["nixl", "cpu_offload#1", "cpu_offload#2"]``)."""
    counts = Counter(base_names)
    seen: Counter[str] = Counter()
    out = []
    for n in base_names:
        if counts[n] > 1:
            seen[n] += 1
            out.append(f"{n}{NAME_SUFFIX_SEP}{seen[n]}")
        else:
            out.append(n)
    return out


def build_children(create: Callable[[Any, Any], T], configs: Sequence[Any], engine: Any,
                   names: Sequence[str]) -> tuple[list[T], list[str], list[tuple[str, str]]]:
    """Build one child per backend config, in order: the children built, their names, and
    ``(name, why)`` of each child that refused the model (:class:`UnsupportedModelError`, for
    :mod:`kvconnect.multi.hybrid` to rule on). If a child fails otherwise, shut down those already
    built (they may hold sockets or threads) and raise, naming the child."""
    built: list[T] = []
    kept: list[str] = []
    refused: list[tuple[str, str]] = []
    for name, cfg in zip(names, configs):
        try:
            built.append(create(cfg, engine))
            kept.append(name)
        except UnsupportedModelError as e:
            refused.append((name, str(e)))
        except Exception:
            logger.error("MultiConnector child %s could not be built", name)
            for child in reversed(built):
                try:
                    child.shutdown()  # type: ignore[attr-defined]
                except Exception:
                    logger.exception("shutting down a child after a failed start")
            raise
    return built, kept, refused


def check_composition(names: Sequence[str]) -> None:
    """Refuse compositions that cannot work, whichever way they were built."""
    if not names:
        raise ConfigError("MultiConnector needs at least one child backend; got none")
    pd = [n for n in names if base_name(n) in PD_BACKENDS]
    if len(pd) > 1:
        raise ConfigError(
            f"children {pd} are both P/D transfer backends: one engine has one P/D peer protocol; "
            "keep one of them"
        )


def resolve_children(config: Any, engine: Any, names: Sequence[str] | None,
                     create: Callable[[Any, Any], T],
                     unsupported_model: str = "fail") -> tuple[list[T], list[str]]:
    """The children and their names: built from a KVConnectConfig through ``create`` (names
    derived from the backends), or given already built (named ``names``, else by class); those
    that cannot serve the model are skipped or fail the start (:mod:`kvconnect.multi.hybrid`;
    the config's ``unsupported_model``, else ``unsupported_model``)."""
    from kvconnect.config import KVConnectConfig, backend_name

    if isinstance(config, KVConnectConfig):
        if names is not None:
            raise ConfigError("names are derived from the config; pass names only with built children")
        names = child_names([backend_name(b) for b in config.backends])
        check_composition(names)
        built, kept, refused = build_children(create, config.backends, engine, names)
        return fit_to_model(built, kept, engine, config.unsupported_model, refused)
    children = list(config)
    names = check_names(names if names is not None else child_names([type(c).__name__ for c in children]),
                        len(children))
    check_composition(names)
    return fit_to_model(children, names, engine, unsupported_model)


def base_name(child_name: str) -> str:
    """The backend name of a child name (``cpu_offload#2`` -> ``cpu_offload``)."""
    return child_name.split(NAME_SUFFIX_SEP, 1)[0]


def check_names(names: Sequence[str], n_children: int) -> list[str]:
    names = list(names)
    if len(names) != n_children:
        raise ConfigError(f"MultiConnector got {n_children} children but {len(names)} names: {names}")
    dup = sorted(n for n, c in Counter(names).items() if c > 1)
    if dup:
        raise ConfigError(f"MultiConnector child names must be unique; repeated: {dup}")
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise ConfigError(f"MultiConnector child names must be non-empty strings, got {bad!r}")
    return names
