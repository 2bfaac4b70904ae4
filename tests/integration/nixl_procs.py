"""Engines in child processes for tests over real NIXL: :func:`serve` hosts P/D test engines
(``tests/unit/pd_harness.py``) in a spawned process, driven by commands over a queue; :class:`Child`
is this process's handle on one. Every wait has a deadline.

Engines run in children (a UCX assertion may fire at exit of a process whose peer was killed; it
must not take pytest with it, and a CUDA context must not leak into the pytest process).
"""

from __future__ import annotations

import os
import queue
import signal
import time
import traceback
from types import SimpleNamespace

from kvconnect.layout import KVLayout

DEADLINE_S = 30.0


def serve(role: str, specs: dict, inq, outq) -> None:
    """Child process: one engine per named spec, all stepped continuously, driven by commands
    ``(command, engine name, ...)``; events come back as ``(event, request id, ...)``. Commands:
    prefill, decode, check (bytes against a producer dump), abort (the engine aborts a consumer
    request) and idle (whether the engine still holds anything)."""
    try:
        from kvconnect.backends.nixl import load_nixl
        from tests.unit.pd_harness import Engine, Req, assert_transferred, decode_start, prefill

        nixl_agent, nixl_agent_config = load_nixl()  # nixl-cu12, or the meta package's pick (cu13 GPUs)
        # An engine_id in a spec pins it (a restarted instance); otherwise it is unique per process.
        engines = {
            name: Engine(
                spec.pop("engine_id", f"{role}-{name}-{os.getpid()}"),
                agent_factory=nixl_agent,
                config_factory=nixl_agent_config,
                **spec,
            )
            for name, spec in specs.items()
        }
        outq.put(("ready", os.getpid()))
        seen_s, seen_r = set(), set()
        while True:
            try:
                cmd = inq.get(timeout=0.002)
            except queue.Empty:
                cmd = None
            for eng in engines.values():
                eng.step()
                for rid in eng.sending - seen_s:
                    seen_s.add(rid)
                    outq.put(("sent", rid))
                for rid in eng.recving - seen_r:
                    seen_r.add(rid)
                    outq.put(("recv", rid, rid in eng.failed, sorted(eng.invalid)))
            if cmd is None:
                continue
            if cmd[0] == "stop":
                break
            eng = engines[cmd[1]]
            if cmd[0] == "prefill":
                _, _, rid, n, ids = cmd
                eng.fill_bytes(seed=11)
                _, params = prefill(eng, rid, n, ids)
                dump = [{k: t.to("cpu", copy=True) for k, (t, _) in c.items()} for c in eng.caches]
                outq.put(("params", rid, params, dump))
            elif cmd[0] == "decode":
                _, _, rid, n, params, ids = cmd
                decode_start(eng, rid, n, params, ids)
            elif cmd[0] == "check":
                _, _, dump, p_spec, p_ids, d_ids, t0, t1 = cmd
                prod = SimpleNamespace(
                    tp=p_spec.get("tp", 1), num_heads=p_spec.get("num_heads", 4),
                    block_size=p_spec.get("block_size", 16), kind=p_spec.get("kind", "flash"),
                    caches=[{k: (t, KVLayout.of_tensor(t, eng.caches[0][k][1].dims)) for k, t in c.items()}
                            for c in dump],
                )
                if eng.device != "cpu":
                    import torch

                    torch.cuda.synchronize(eng.device)
                try:
                    assert_transferred(prod, eng, p_ids, d_ids, t0, t1)
                    outq.put(("checked", cmd[1], "ok"))
                except AssertionError as e:
                    outq.put(("checked", cmd[1], str(e)))
            elif cmd[0] == "abort":
                _, _, rid, n, params, ids = cmd
                delay, _ = eng.sched.request_finished(Req(rid, list(range(n)), params, "abort").view(), ids)
                outq.put(("aborted", rid, delay))
            elif cmd[0] == "idle":
                held = eng.sched.has_pending_work() or any(w._loop.holds_work() for w in eng.workers)
                outq.put(("idle", cmd[1], not held))
        for eng in engines.values():
            eng.shutdown()
        outq.put(("stopped",))
    except Exception:
        outq.put(("error", traceback.format_exc()))
        raise  # and exit non-zero, so close() sees it even if no one reads the queue again


class Child:
    def __init__(self, ctx, role: str, specs: dict[str, dict]) -> None:
        self.inq, self.outq = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=serve, args=(role, specs, self.inq, self.outq), daemon=True)
        self.proc.start()
        self.events: list[tuple] = []
        self._pid: int | None = None
        self.killed = False  # by the test, on purpose: its exit code is the signal's

    @property
    def pid(self) -> int:
        """Waits for the child to be ready (children start in parallel: ask after spawning all)."""
        if self._pid is None:
            self._pid = self.expect("ready")[1]
        return self._pid

    def send(self, *cmd) -> None:
        self.inq.put(cmd)

    def signal(self, sig: int) -> None:
        """Sends ``sig`` to the child; a SIGKILL is a deliberate death that close() accepts."""
        self.killed |= sig == signal.SIGKILL
        os.kill(self.pid, sig)

    def expect(self, kind: str, rid: str | None = None, timeout: float = DEADLINE_S) -> tuple:
        end = time.monotonic() + timeout
        for ev in self.events:
            if ev[0] == kind and (rid is None or ev[1] == rid):
                self.events.remove(ev)
                return ev
        while time.monotonic() < end:
            try:
                ev = self.outq.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                break
            if ev[0] == "error":
                raise AssertionError(f"child failed:\n{ev[1]}")
            if ev[0] == kind and (rid is None or ev[1] == rid):
                return ev
            self.events.append(ev)
        raise AssertionError(f"no {kind!r} event for {rid!r} within {timeout}s (got {self.events})")

    def close(self) -> None:
        """Stops the child and checks it exited cleanly: exit code 0 unless the test killed it (a
        crash at exit, e.g. in UCX's teardown, fails the test that ran it)."""
        if self.proc.is_alive():
            self.send("stop")
            self.proc.join(timeout=10)
        hung = self.proc.is_alive()
        if hung:
            self.proc.kill()
            self.proc.join(timeout=5)
        if not self.killed:
            assert not hung, f"child {self._pid} did not stop within 10 s of being told to"
            assert self.proc.exitcode == 0, f"child {self._pid} exited with {self.proc.exitcode}"


def close_all(children: list[Child]) -> None:
    """Closes every child, then fails naming each that did not exit cleanly."""
    errors = []
    for c in children:
        try:
            c.close()
        except AssertionError as e:
            errors.append(str(e))
    assert not errors, "; ".join(errors)


def spawn_children(ctx, *specs: tuple[str, dict]) -> list[Child]:
    made = [Child(ctx, role, spec) for role, spec in specs]
    for c in made:
        c.pid  # noqa: B018 - wait until ready (they start in parallel)
    return made
