"""The ``kvconnect`` command."""

from __future__ import annotations

import argparse
import importlib
import json
import sys


def _cmd_config(args: argparse.Namespace) -> int:
    from kvconnect.config import defaults_table, parse_config
    from kvconnect.errors import ConfigError

    if args.json is None:
        print(defaults_table())
        return 0
    try:
        cfg = parse_config(json.loads(args.json))
    except (ConfigError, json.JSONDecodeError) as e:
        print(f"invalid: {e}", file=sys.stderr)
        return 2
    print("valid:", ", ".join(cfg.names))
    return 0


def _cmd_selfcheck(args: argparse.Namespace) -> int:
    from kvconnect.selfcheck import run

    return run(verbose=True)


def _cmd_bench(args: argparse.Namespace) -> int:
    from kvconnect.bench import BENCHMARKS

    if args.name is None:
        from kvconnect.bench.report import main as report_main

        return report_main(args.rest)
    if args.name not in BENCHMARKS:
        print(f"unknown benchmark {args.name!r}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    return importlib.import_module(f"kvconnect.bench.{args.name}").main(args.rest)


def _cmd_demo(args: argparse.Namespace) -> int:
    from kvconnect.demo import main as demo_main

    return demo_main(args.rest)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["top"]:
        # Its own parser takes every argument in place (options may come before the URLs).
        from kvconnect.top import main as top_main

        return top_main(argv[1:])
    p = argparse.ArgumentParser(
        prog="kvconnect",
        description="One KV-cache connector for vLLM and SGLang: NIXL/MoRI P/D transfer, CPU offload, "
        "a shared Mooncake tier, composed.",
    )
    p.add_argument("--version", action="store_true", help="print the version")
    sub = p.add_subparsers(dest="cmd")
    c = sub.add_parser("config", help="print every option with its default, or validate a JSON config")
    c.add_argument("json", nargs="?", help="a JSON config to validate")
    c.set_defaults(fn=_cmd_config)
    s = sub.add_parser(
        "selfcheck", help="check the installation: layouts, wire types, side channel, backends"
    )
    s.set_defaults(fn=_cmd_selfcheck)
    b = sub.add_parser(
        "bench", help="run a benchmark (offload, transfer, scheduler, serve, store) or all but serve"
    )
    b.add_argument("name", nargs="?")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(fn=_cmd_bench)
    d = sub.add_parser("demo", help="P/D on this CPU with a tiny model, side by side with one instance")
    d.add_argument("rest", nargs=argparse.REMAINDER)
    d.set_defaults(fn=_cmd_demo)
    sub.add_parser("top", help="live view of running servers from their /metrics (--once: one snapshot)")
    # Flags after `bench NAME` / `demo` belong to that command, not to this parser.
    args, extra = p.parse_known_args(argv)
    if extra:
        if getattr(args, "cmd", None) not in ("bench", "demo"):
            p.error(f"unrecognized arguments: {' '.join(extra)}")
        args.rest = list(args.rest or []) + extra
    if args.version:
        from kvconnect import __version__

        print(__version__)
        return 0
    if not hasattr(args, "fn"):
        p.print_help()
        return 0
    from kvconnect.errors import KVConnectError

    try:
        return int(args.fn(args) or 0)
    except KVConnectError as e:
        # kvconnect's own refusals name what was wrong: the message is the report, not a traceback.
        print(f"kvconnect {args.cmd}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
