"""The pure parts of ``kvconnect bench serve``: percentiles, a level's figures, the comparison with
the single instance, the table / JSON / markdown, the plot file, and argument checks."""

from __future__ import annotations

import json

import pytest

from kvconnect.bench import serve as B
from kvconnect.bench import serve_stats as SS
from kvconnect.testing.load import LoadResult, mixed_requests

pytestmark = pytest.mark.unit


def res(key: str, ids: list[int] | None = None, *, ttft: float | None = 0.1, e2e: float = 0.5,
        itl: list[float] | None = None, aborted: bool = False, error: str | None = None) -> LoadResult:
    r = LoadResult(key, token_ids=ids, aborted=aborted, error=error, latency_s=e2e, ttft_s=ttft)
    r.itl_s = list(itl or [])
    return r


def test_percentile_interpolates_between_ranks_like_numpy():
    xs = [4.0, 1.0, 3.0, 2.0]
    assert SS.percentile(xs, 0) == 1.0
    assert SS.percentile(xs, 100) == 4.0
    assert SS.percentile(xs, 50) == pytest.approx(2.5)
    assert SS.percentile(xs, 90) == pytest.approx(3.7)  # numpy.percentile([1,2,3,4], 90)
    assert SS.percentile([7.0], 99) == 7.0


def test_percentile_of_nothing_is_none_and_bad_q_is_refused():
    assert SS.percentile([], 50) is None
    with pytest.raises(ValueError, match="q must be"):
        SS.percentile([1.0], 101)


def test_summarize_counts_hangups_apart_from_failures_and_keeps_them_out_of_latencies():
    results = [
        res("a", [1, 2, 3], ttft=0.1, e2e=0.3, itl=[0.1, 0.1]),
        res("b", [4, 5], ttft=0.2, e2e=0.6, itl=[0.4]),
        res("c", aborted=True, ttft=None, e2e=9.0),
        res("d", error="HTTP 500", ttft=None, e2e=8.0),
    ]
    row = SS.summarize(results, wall_s=2.0, concurrency=4, reference={"a": [1, 2, 3], "b": [4, 6]})
    assert (row["requests"], row["completed"], row["hung_up"], row["failed"]) == (4, 2, 1, 1)
    assert row["requests_per_s"] == pytest.approx(1.0)
    assert row["output_tokens_per_s"] == pytest.approx(2.5)
    assert row["ttft_ms"]["p50"] == pytest.approx(150.0)
    # TPOT per request: a (0.3-0.1)/2 = 0.1 s, b (0.6-0.2)/1 = 0.4 s
    assert row["tpot_ms"]["mean"] == pytest.approx(250.0)
    assert row["itl_ms"]["p50"] == pytest.approx(100.0)
    assert row["e2e_ms"]["p99"] < 1000  # the hung-up (9 s) and failed (8 s) requests are not in it
    assert (row["compared"], row["differing"], row["examples"]) == (2, 1, ["b"])
    assert row["errors"] == ["HTTP 500"]


def test_outputs_that_arrived_in_one_chunk_are_counted():
    row = SS.summarize([res("a", [1, 2, 3], itl=[]), res("b", [1, 2], itl=[0.01]), res("c", [1], itl=[])],
                       1.0, 1, {})
    assert row["one_chunk"] == 1  # "a": three tokens, no gap; "c" has a single token


def test_single_token_outputs_have_no_tpot():
    row = SS.summarize([res("a", [1], ttft=0.1, e2e=0.1)], 1.0, 1, {})
    assert row["tpot_ms"]["p50"] is None
    assert row["ttft_ms"]["p50"] == pytest.approx(100.0)


def test_compare_never_counts_an_output_without_reference_as_equal():
    c = SS.compare([res("a", [1]), res("z", [2]), res("y", aborted=True)], {"a": [1]})
    assert (c.compared, c.differing, c.unreferenced) == (1, 0, 1)


def test_reference_stack_row_compares_nothing():
    row = SS.summarize([res("a", [1, 2])], 1.0, 1, None)
    assert row["compared"] is None and row["differing"] is None


def test_reference_outputs_keep_only_completed_results():
    ref = SS.reference_outputs([res("a", [1, 2]), res("b", aborted=True), res("c", error="x"), res("d", [])])
    assert ref == {"a": [1, 2], "d": []}


def test_tables_and_json_carry_every_row():
    rows = [("single", SS.summarize([res("a", [1, 2])], 1.0, 1, None)),
            ("kvc-pull", SS.summarize([res("a", [1, 3])], 1.0, 8, {"a": [1, 2]}))]
    rows[0][1]["left_behind"] = {}
    rows[1][1]["left_behind"] = {"prefill": {"kv_cache_usage_perc": 0.1}}
    text = SS.text_table(rows).splitlines()
    assert text[0].startswith("stack") and len(text) == 4
    assert "ref" in text[2] and "none" in text[2]
    assert text[3].split()[-4:] == ["1", "1", "1", "YES"]  # one chunk, compared, differing, something left
    md = SS.markdown_table(rows).splitlines()
    assert len(md) == 4 and md[1].startswith("|---|")
    assert json.loads(SS.to_json({"rows": rows}))["rows"][1][1]["differing"] == 1


def test_ratios_pair_levels_both_stacks_ran():
    def row(c: int, ttft: float, tput: float) -> dict:
        return {"concurrency": c, "ttft_ms": {"p50": ttft}, "output_tokens_per_s": tput}

    rows = {"vllm-nixl": [row(1, 200.0, 10.0), row(8, 400.0, 40.0)],
            "kvc-pull": [row(1, 50.0, 12.0), row(8, 100.0, 80.0), row(32, 1.0, 1.0)]}
    r = SS.ratios(rows, "kvc-pull", "vllm-nixl")
    assert [x["concurrency"] for x in r] == [1, 8]
    assert r[1]["ttft_p50_ratio"] == pytest.approx(0.25) and r[1]["throughput_ratio"] == pytest.approx(2.0)


def test_targets_need_every_level_under_the_ttft_bar_and_the_top_level_over_the_throughput_bar():
    def r(c: int, t: float | None, x: float | None) -> dict:
        return {"concurrency": c, "ttft_p50_ratio": t, "throughput_ratio": x}

    assert SS.targets_met([r(1, 0.4, 1.0), r(8, 0.5, 1.6)]) == {"ttft": True, "throughput": True}
    assert SS.targets_met([r(1, 0.6, 9.0), r(8, 0.1, 1.4)]) == {"ttft": False, "throughput": False}
    assert SS.targets_met([r(1, None, None)]) == {"ttft": False, "throughput": False}
    assert SS.targets_met([]) == {"ttft": False, "throughput": False}


def _report() -> dict:
    rows = {}
    for s, ttft in (("single", 0.02), ("vllm-nixl", 0.2), ("kvc-pull", 0.06)):
        rows[s] = []
        for c in (1, 4):
            row = SS.summarize(
                [res("a", [1, 2, 3], ttft=ttft * c, e2e=ttft * c + 0.1, itl=[0.05, 0.05])],
                2.0,
                c,
                None if s == "single" and c == 1 else {"a": [1, 2, 3]},
            )
            row.update(left_behind={}, hangups_sent=c == 4, left_wait_s=0.0)
            rows[s].append(row)
    return {
        "command": "kvconnect bench serve --levels 1,4",
        "date": "today",
        "took_s": 60.0,
        "machine": {"cpu": "cpu", "usable_cores": 2, "gpu": None},
        "config": {
            "model": "llama_gqa",
            "levels": [1, 4],
            "requests": 1,
            "max_tokens": 3,
            "min_tokens": 3,
            "max_prompt": 10,
            "hangup_fraction": 0.1,
            "hangup_levels": 1,
            "hangup_window": (0.0, 1.0),
            "lease_s": 20.0,
        },
        "stacks": list(rows),
        "rows": rows,
        "start_s": {s: 40.0 for s in rows},
        "errors": {},
        "ratios": {"kvc-pull": SS.ratios(rows, "kvc-pull", "vllm-nixl")},
    }


def test_markdown_report_names_the_command_the_plot_and_the_ratios():
    md = B.markdown(_report(), "bench-serve.png")
    assert "`kvconnect bench serve --levels 1,4`" in md
    assert "![TTFT and throughput against concurrency](bench-serve.png)" in md
    assert "TTFT P50 ratio by concurrency 1: 0.30, 4: 0.30" in md
    assert "TTFT **met**, throughput **not met**" in md
    assert "nothing, on every server of every stack" in md
    assert md.count("| P/D") == 0 and md.count("| kvc-pull |") == 2


def test_plot_writes_a_png(tmp_path):
    from kvconnect.bench.serve_plot import plot

    out = plot(_report(), tmp_path / "d" / "p.png", B.LABELS)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, field", [
    (["--stacks", "single,bogus"], "--stacks"),
    (["--levels", "0,4"], "--levels"),
    (["--levels", "a"], "--levels"),
    (["--min-tokens", "9", "--max-tokens", "4"], "--min-tokens"),
    (["--max-prompt", "600"], "--max-prompt"),
    (["--hangup-fraction", "1.5"], "--hangup-fraction"),
])
def test_bad_arguments_are_refused_naming_the_flag(argv, field, capsys):
    with pytest.raises(SystemExit):
        B._args(argv)
    assert field in capsys.readouterr().err


def test_single_runs_first_whatever_the_order_given():
    a = B._args(["--stacks", "kvc-push,single", "--levels", "8,1"])
    assert a.stacks == ["single", "kvc-push"] and a.levels == [1, 8]


def test_levels_without_hangups_send_every_request_to_the_end_and_streamed():
    base = mixed_requests(40, vocab=1024, seed=3, abort_fraction=0.5, stream_fraction=1.0)
    assert any(r.abort_after_s is not None for r in base) and all(r.stream for r in base)
    calm = B.level_requests(base, with_hangups=False)
    assert all(r.abort_after_s is None and r.stream for r in calm)
    assert [r.prompt for r in calm] == [r.prompt for r in base]
    assert B.level_requests(base, with_hangups=True) == base


def test_mixed_requests_keep_output_lengths_within_bounds():
    rs = mixed_requests(50, vocab=1024, seed=1, min_tokens=8, max_tokens=16)
    assert all(8 <= r.max_tokens <= 16 for r in rs)
    with pytest.raises(ValueError, match="min_tokens"):
        mixed_requests(1, vocab=1024, min_tokens=0)


def _fake_openai_server(delays: list[float]):
    """A local /v1/completions that streams one token per chunk after each delay (aiohttp)."""
    import asyncio
    import socket
    import threading

    from aiohttp import web

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i, d in enumerate(delays[: body["max_tokens"]]):
            await asyncio.sleep(d)
            chunk = {"choices": [{"token_ids": [body["prompt"][0] + i], "finish_reason": None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/v1/completions", handle)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)

    return f"http://127.0.0.1:{port}", stop


def test_load_driver_times_first_token_and_gaps_and_hangs_up():
    from kvconnect.testing.load import LoadRequest, run_load

    url, stop = _fake_openai_server([0.15, 0.05, 0.05, 0.05])
    try:
        rep = run_load(url, [LoadRequest("s", [10], 4, stream=True),
                             LoadRequest("gone", [20], 4, stream=True, abort_after_s=0.1)], concurrency=2,
                       request_timeout_s=10, total_timeout_s=20)
    finally:
        stop()
    s, gone = rep.results["s"], rep.results["gone"]
    assert s.token_ids == [10, 11, 12, 13] and s.error is None
    assert 0.14 <= s.ttft_s < s.latency_s
    # Lower bounds hold on a loaded machine too: the server sends the last token 0.3 s in, so the
    # client cannot see it sooner, however its reads bunch the tokens together.
    assert len(s.itl_s) == 3 and all(0 <= g < 2 for g in s.itl_s)
    assert 0.29 <= s.ttft_s + sum(s.itl_s) <= s.latency_s
    assert gone.aborted and gone.token_ids is None and gone.ttft_s is None and gone.itl_s == []


def test_request_record_gives_milliseconds_and_prompt_length():
    rec = SS.request_record(res("a", [1, 2], ttft=0.25, e2e=0.5), 37)
    assert rec == {"key": "a", "prompt": 37, "tokens": 2, "hung_up": False, "error": None,
                   "ttft_ms": 250.0, "e2e_ms": 500.0}
