"""The MultiConnector's rule for models with several KV-cache groups (hybrid attention).

vLLM's own MultiConnector reports hybrid support when *any* child does and then hands every child
every group; a child built for one group would then read per-group block lists it does not
understand. kvconnect instead starts a composition on a hybrid model only when it can serve it
correctly:

* a child that supports the model (``supports_hybrid``, and built without an
  :class:`~kvconnect.errors.UnsupportedModelError`) serves every group;
* a child that cannot handle one of the groups cannot serve the model at all: a prefix hit must
  fill every group before the engine can use it, so a child serving only some groups has no hit
  to offer. It is either **skipped** (``"unsupported_model": "skip"``: left out of the
  composition, on both halves alike, with a warning naming it and why) or the start **fails**
  (the default) with an error naming the child and why.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, TypeVar

from kvconnect.errors import UnsupportedModelError

logger = logging.getLogger(__name__)
T = TypeVar("T")

POLICIES = ("fail", "skip")


def num_groups(engine: Any) -> int:
    return max(len(getattr(engine, "block_sizes", ()) or ()), 1)


def refusal(child: Any, engine: Any) -> str | None:
    """Why ``child`` cannot serve ``engine``'s model, or None when it can."""
    if num_groups(engine) > 1 and not getattr(child, "supports_hybrid", False):
        return f"{type(child).__name__} handles one KV-cache group only (supports_hybrid=False)"
    return None


def fit_to_model(children: Sequence[T], names: Sequence[str], engine: Any, policy: str,
                 refused: Sequence[tuple[str, str]] = ()) -> tuple[list[T], list[str]]:
    """The children (and names) that serve the model, after applying ``policy`` to those that
    cannot; ``refused`` lists ``(name, why)`` of children whose build already refused it."""
    if policy not in POLICIES:
        raise UnsupportedModelError(f"unsupported_model must be one of {POLICIES}, got {policy!r}")
    out: list[tuple[T, str]] = []
    why = list(refused)
    for c, n in zip(children, names):
        r = refusal(c, engine)
        if r is None:
            out.append((c, n))
        else:
            why.append((n, r))
    if not why:
        return list(children), list(names)
    if policy == "skip" and out:
        for n, r in why:
            logger.warning("MultiConnector: child %s is skipped on this model: %s", n, r)
        _shutdown(c for c in children if all(c is not k for k, _ in out))
        return [c for c, _ in out], [n for _, n in out]
    _shutdown(children)
    n, r = why[0]
    left = "" if out else " (no child can serve it)"
    raise UnsupportedModelError(
        f"MultiConnector child {n!r} cannot serve this model ({num_groups(engine)} KV-cache "
        f"groups): {r}{left}; remove it from 'backends'"
        + (" or set \"unsupported_model\": \"skip\" to run without it" if out else "")
    )


def _shutdown(children) -> None:
    for c in children:
        try:
            c.shutdown()
        except Exception:
            logger.exception("shutting down a child left out of a composition")
