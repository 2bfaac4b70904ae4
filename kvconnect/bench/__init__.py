"""Benchmarks behind ``kvconnect bench NAME``: each module has ``main(argv) -> int`` and prints
its figures next to the reference it is measured against, in the same run."""

BENCHMARKS = ("offload", "transfer", "scheduler", "serve")
