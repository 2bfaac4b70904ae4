"""Sustained load on an OpenAI-compatible ``/v1/completions`` endpoint: several concurrent
clients, greedy requests given as token ids, some of which hang up mid-request (the server sees a
client disconnect and aborts the request). Used by kvconnect's load test against a real P/D
deployment and by ``kvconnect bench serve``; usable against any deployment (``run_load(url, requests)``).
A streamed request records when each chunk arrived: time to first token and the gaps between
tokens, measured as ``vllm bench serve`` measures them.

Every request and the whole run are bounded by deadlines: a hang is reported, never waited out.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvconnect.testing.launch import DEFAULT_MODEL_NAME


@dataclass(frozen=True)
class LoadRequest:
    key: str
    prompt: list[int]
    max_tokens: int
    stream: bool = False
    #: The client closes its connection this many seconds after sending (None: reads it all).
    abort_after_s: float | None = None


@dataclass
class LoadResult:
    key: str
    token_ids: list[int] | None = None
    finish_reason: str | None = None
    #: The client hung up before the response was complete.
    aborted: bool = False
    error: str | None = None
    latency_s: float = 0.0
    #: Streamed requests: seconds from sending to the first chunk that carried a token.
    ttft_s: float | None = None
    #: Streamed requests: seconds between consecutive token-carrying chunks.
    itl_s: list[float] = field(default_factory=list)


@dataclass
class LoadReport:
    results: dict[str, LoadResult]
    concurrency: int
    wall_s: float
    counts: dict[str, int] = field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        r = list(self.results.values())
        done = [x for x in r if not x.aborted and x.error is None]
        return {
            "requests": len(r),
            "concurrency": self.concurrency,
            "aborted_by_client": sum(x.aborted for x in r),
            "completed": len(done),
            "errors": sum(x.error is not None for x in r),
            "wall_s": round(self.wall_s, 1),
            "requests_per_s": round(len(r) / self.wall_s, 1) if self.wall_s > 0 else 0.0,
        }


def _body(req: LoadRequest, model: str) -> dict[str, Any]:
    return {
        "model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0.0,
        "seed": 0, "ignore_eos": True, "return_token_ids": True, "stream": req.stream,
    }


async def _read(resp: Any, out: LoadResult, stream: bool, t0: float) -> None:
    """Fill ``out`` from the response, timing each token-carrying chunk of a stream."""
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
    if not stream:
        ch = (await resp.json())["choices"][0]
        out.token_ids, out.finish_reason = ch.get("token_ids"), ch.get("finish_reason")
        return
    ids: list[int] = []
    finish = None
    last: float | None = None
    async for raw in resp.content:
        line = raw.decode().strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[5:])
        if chunk.get("error"):
            raise RuntimeError(f"stream error: {chunk['error']}")
        got = 0
        for ch in chunk.get("choices") or []:
            got += len(ch.get("token_ids") or ())
            ids.extend(ch.get("token_ids") or ())
            finish = ch.get("finish_reason") or finish
        if got:
            now = time.perf_counter()
            if last is None:
                out.ttft_s = now - t0
            else:
                out.itl_s.append(now - last)
            last = now
    out.token_ids, out.finish_reason = ids, finish


async def _one(session: Any, url: str, req: LoadRequest, model: str, timeout_s: float) -> LoadResult:
    out = LoadResult(req.key)
    t0 = time.perf_counter()

    async def call() -> None:
        async with session.post(url, json=_body(req, model)) as resp:
            await _read(resp, out, req.stream, t0)

    try:
        if req.abort_after_s is not None:
            try:  # cancelling the call closes its connection: the server sees the client leave
                await asyncio.wait_for(call(), req.abort_after_s)
            except asyncio.TimeoutError:
                out.aborted, out.token_ids, out.finish_reason = True, None, None
                out.ttft_s, out.itl_s = None, []
        else:
            await asyncio.wait_for(call(), timeout_s)
    except asyncio.TimeoutError:
        out.error = f"no complete response within {timeout_s:.0f} s"
    except Exception as e:  # one failed request is a figure, not the end of the run
        out.error = f"{type(e).__name__}: {e}"[:300]
    out.latency_s = time.perf_counter() - t0
    return out


async def _run(url: str, requests: Sequence[LoadRequest], concurrency: int, model: str,
               timeout_s: float) -> dict[str, LoadResult]:
    import aiohttp

    queue: asyncio.Queue[LoadRequest] = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)
    results: dict[str, LoadResult] = {}
    conn = aiohttp.TCPConnector(limit=concurrency, force_close=True)
    async with aiohttp.ClientSession(connector=conn) as session:

        async def client() -> None:
            while True:
                try:
                    req = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results[req.key] = await _one(session, url, req, model, timeout_s)

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return results


def run_load(base_url: str, requests: Sequence[LoadRequest], *, concurrency: int = 8,
             model: str = DEFAULT_MODEL_NAME, request_timeout_s: float = 120.0,
             total_timeout_s: float = 900.0) -> LoadReport:
    """Send ``requests`` from ``concurrency`` clients, each taking the next request when its last
    one ended; raises TimeoutError if the whole run outlasts ``total_timeout_s``."""
    if len({r.key for r in requests}) != len(requests):
        raise ValueError("run_load: request keys must be unique")
    url = base_url.rstrip("/") + "/v1/completions"
    t0 = time.perf_counter()
    results = asyncio.run(asyncio.wait_for(_run(url, requests, concurrency, model, request_timeout_s),
                                           total_timeout_s))
    return LoadReport(results, concurrency, time.perf_counter() - t0)


def mixed_requests(n: int, *, vocab: int, seed: int = 0, max_prompt: int = 300, max_tokens: int = 16,
                   shared_prefix: int = 96, abort_fraction: float = 0.1,
                   abort_window_s: tuple[float, float] = (0.0, 0.3), min_tokens: int = 1,
                   stream_fraction: float = 0.25) -> list[LoadRequest]:
    """``n`` distinct prompts of 1..``max_prompt`` tokens (a third start with one of a few shared
    prefixes), ``min_tokens``..``max_tokens`` output tokens, ``stream_fraction`` of them streamed,
    and ``abort_fraction`` of them hung up by the client at a random moment within ``abort_window_s``."""
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"mixed_requests: need 1 <= min_tokens ({min_tokens}) <= max_tokens ({max_tokens})")
    rng = random.Random(seed)
    prefixes = [[rng.randrange(8, vocab) for _ in range(shared_prefix)] for _ in range(3)]
    out = []
    for i in range(n):
        length = rng.randint(1, max_prompt)
        head = rng.choice(prefixes) if rng.random() < 1 / 3 and length > shared_prefix else []
        prompt = head + [rng.randrange(8, vocab) for _ in range(length - len(head))]
        abort = rng.uniform(*abort_window_s) if rng.random() < abort_fraction else None
        out.append(LoadRequest(f"r{i}", prompt, rng.randint(min_tokens, max_tokens),
                               stream=rng.random() < stream_fraction, abort_after_s=abort))
    return out
