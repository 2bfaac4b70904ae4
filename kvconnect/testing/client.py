"""Greedy HTTP clients for the OpenAI-compatible servers under test.

:func:`completion` and :func:`chat`, with ``stream=True`` or not, return the generated text and
token ids (vLLM's ``return_token_ids``) as a :class:`Generation`; :func:`post_json` and
:func:`http_get` are the plain requests underneath. An HTTP error carries the response body.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvconnect.testing.launch import DEFAULT_MODEL_NAME
from kvconnect.testing.procs import ServerError

REQUEST_TIMEOUT_S = 120.0


@dataclass
class Generation:
    """What one request produced."""

    text: str
    token_ids: list[int] | None
    prompt_token_ids: list[int] | None
    finish_reason: str | None
    latency_s: float
    first_chunk_s: float | None = None  # streaming: time to the first content chunk
    kv_transfer_params: dict | None = None
    raw: Any = None


def http_get(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode("utf-8", "replace")


def post_json(url: str, body: Mapping[str, Any], timeout: float = REQUEST_TIMEOUT_S) -> dict:
    """POST JSON, return the decoded JSON answer; HTTP errors carry the response body."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace")[:2000]
        raise ServerError(f"POST {url} -> HTTP {e.code}: {detail}") from e


def _iter_sse(url: str, body: Mapping[str, Any], timeout: float) -> Iterator[dict]:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
        method="POST",
    )
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace")[:2000]
        raise ServerError(f"POST {url} (stream) -> HTTP {e.code}: {detail}") from e
    with resp:
        for raw in resp:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                raise ServerError(f"stream from {url} reported an error: {chunk['error']}")
            yield chunk


def _request_body(
    model: str, max_tokens: int, extra: Mapping[str, Any] | None, stream: bool, ignore_eos: bool
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "seed": 0,
        "ignore_eos": ignore_eos,  # a random model may emit EOS early; keep lengths fixed
        "return_token_ids": True,
        "stream": stream,
    }
    if extra:
        body.update(extra)
    return body


def completion(
    base_url: str,
    prompt: str | list[int],
    *,
    max_tokens: int = 16,
    stream: bool = False,
    model: str = DEFAULT_MODEL_NAME,
    ignore_eos: bool = True,
    extra: Mapping[str, Any] | None = None,
    timeout: float = REQUEST_TIMEOUT_S,
) -> Generation:
    """Greedy ``/v1/completions``; returns text and generated token ids."""
    body = _request_body(model, max_tokens, extra, stream, ignore_eos)
    body["prompt"] = prompt
    url = base_url.rstrip("/") + "/v1/completions"
    t0 = time.perf_counter()
    if not stream:
        r = post_json(url, body, timeout)
        ch = r["choices"][0]
        return Generation(
            text=ch.get("text") or "",
            token_ids=ch.get("token_ids"),
            prompt_token_ids=ch.get("prompt_token_ids"),
            finish_reason=ch.get("finish_reason"),
            latency_s=time.perf_counter() - t0,
            kv_transfer_params=r.get("kv_transfer_params"),
            raw=r,
        )
    return _collect_stream(url, body, timeout, t0, chat=False)


def chat(
    base_url: str,
    messages: Sequence[Mapping[str, str]] | str,
    *,
    max_tokens: int = 16,
    stream: bool = False,
    model: str = DEFAULT_MODEL_NAME,
    ignore_eos: bool = True,
    extra: Mapping[str, Any] | None = None,
    timeout: float = REQUEST_TIMEOUT_S,
) -> Generation:
    """Greedy ``/v1/chat/completions``; a plain string is sent as one user message."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    body = _request_body(model, max_tokens, extra, stream, ignore_eos)
    body["messages"] = list(messages)
    url = base_url.rstrip("/") + "/v1/chat/completions"
    t0 = time.perf_counter()
    if not stream:
        r = post_json(url, body, timeout)
        ch = r["choices"][0]
        return Generation(
            text=(ch.get("message") or {}).get("content") or "",
            token_ids=ch.get("token_ids"),
            prompt_token_ids=r.get("prompt_token_ids") or ch.get("prompt_token_ids"),
            finish_reason=ch.get("finish_reason"),
            latency_s=time.perf_counter() - t0,
            kv_transfer_params=r.get("kv_transfer_params"),
            raw=r,
        )
    return _collect_stream(url, body, timeout, t0, chat=True)


def _collect_stream(url: str, body: dict, timeout: float, t0: float, *, chat: bool) -> Generation:
    texts: list[str] = []
    token_ids: list[int] = []
    saw_ids = False
    prompt_ids = None
    finish = None
    first = None
    kv_params = None
    n_chunks = 0
    for chunk in _iter_sse(url, body, timeout):
        n_chunks += 1
        if chunk.get("prompt_token_ids") is not None:
            prompt_ids = chunk["prompt_token_ids"]
        if chunk.get("kv_transfer_params") is not None:
            kv_params = chunk["kv_transfer_params"]
        for ch in chunk.get("choices") or []:
            piece = (ch.get("delta") or {}).get("content") if chat else ch.get("text")
            if ch.get("prompt_token_ids") is not None:
                prompt_ids = ch["prompt_token_ids"]
            ids = ch.get("token_ids")
            if ids is not None:
                saw_ids = True
                token_ids.extend(ids)
            if (piece or ids) and first is None:
                first = time.perf_counter() - t0
            if piece:
                texts.append(piece)
            if ch.get("finish_reason"):
                finish = ch["finish_reason"]
    return Generation(
        text="".join(texts),
        token_ids=token_ids if saw_ids else None,
        prompt_token_ids=prompt_ids,
        finish_reason=finish,
        latency_s=time.perf_counter() - t0,
        first_chunk_s=first,
        kv_transfer_params=kv_params,
        raw={"chunks": n_chunks},
    )
