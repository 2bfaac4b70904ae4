"""What the MultiConnector's scheduler half hands its worker half each step, and child naming
and composition rules (the registry builds the children; both halves compose them alike).

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


def compose(children: Sequence[T], names: Sequence[str] | None, engine: Any,
            unsupported_model: str = "fail",
            refused: Sequence[tuple[str, str]] = ()) -> tuple[list[T], list[str]]:
    """The built children that make up a composition and their names (``names``, by default
    after the children's classes): refuses compositions that cannot work and applies
    ``unsupported_model`` to those that cannot serve the model (:mod:`kvconnect.multi.hybrid`);
    ``refused`` lists ``(name, why)`` of children whose build already refused the model."""
    children = list(children)
    names = check_names(names if names is not None else child_names([type(c).__name__ for c in children]),
                        len(children))
    check_composition([*names, *(n for n, _ in refused)])
    return fit_to_model(children, names, engine, unsupported_model, refused)


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
