"""kvconnect: one engine-neutral KV-cache connector for vLLM and SGLang.

Importing this package is cheap on purpose (engines import it in every process): it pulls in
neither torch, zmq nor any engine. Heavy modules are imported where they are used.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
