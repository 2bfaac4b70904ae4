"""``kvconnect demo``: placeholder until the vLLM adapter lands; runs the self-check."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from kvconnect.selfcheck import run

    return run(verbose=True)
