"""UCX environment defaults kvconnect applies before the first NIXL agent loads UCX.

UCX reads its settings from the environment, once, when a NIXL agent first loads it; so these are
environment variables, not kvconnect config keys, and a value the user already set always wins.

``UCX_MODULES=^efa``: on a host where Debian's ``ibverbs-providers`` is installed (every RDMA host,
and anything that installed ``libibverbs1``), the UCX bundled in the ``nixl`` wheels loads its EFA
module, which pulls the host's libibverbs / libnl next to the wheel's own copies; at process exit
a destructor of the host copy dereferences NULL, so every process that created a UCX agent dies
with SIGSEGV (a vLLM or SGLang worker at shutdown included). Leaving EFA out avoids it. On AWS EFA
hosts that need it, set ``UCX_MODULES`` yourself (``UCX_MODULES=all`` loads every module).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

#: Variable -> kvconnect's default, applied only where the variable is unset.
UCX_DEFAULTS: dict[str, str] = {"UCX_MODULES": "^efa"}


def apply_ucx_defaults(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set each of :data:`UCX_DEFAULTS` that ``environ`` does not already hold; returns what was set."""
    applied = {k: v for k, v in UCX_DEFAULTS.items() if k not in environ}
    environ.update(applied)
    return applied
