"""`AsyncLLMEngine`: a background step loop over `LLMEngine` for callers on an asyncio loop.

    engine = AsyncLLMEngine(llm_engine)
    async for out in engine.generate("Hello", SamplingParams(max_tokens=8), "req-1"):
        print(out.outputs[0].text, end="")          # a delta: only the new text / tokens / logprobs

One thread runs `LLMEngine.step()` while any request is unfinished (a step blocks in
`executor.execute`, so it cannot run on the event loop) and sleeps otherwise. Requests join the
running batch between steps (`add_request` is thread-safe). Each request has an asyncio queue on
its caller's loop; the thread hands it every delta output with `call_soon_threadsafe`, and a
reader that fell behind gets the deltas queued so far merged into one. Leaving
the `async for` early (break, cancellation, a client that went away) aborts the request, which
frees its KV blocks at the next step. A rank the executor could rebuild only delays the streams
(`LLMEngine` recomputes them); if a step raises (a dead rank past `max_restarts`), the engine is
dead: every open stream and every later call raises that error, and `dead` holds its message.

`drain(timeout_s)` is the graceful shutdown: new `generate` calls raise `EngineDrainingError`,
running requests get up to `timeout_s` to finish, the rest are aborted (finish_reason "abort").
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator

from scheduler.engine import LLMEngine
from scheduler.errors import EngineDrainingError
from scheduler.executor import EngineDeadError
from scheduler.metrics import EngineMetrics
from scheduler.request import RequestOutput
from scheduler.sampling_params import SamplingParams
from scheduler.streaming import OutputDeltas, merge_deltas

logger = logging.getLogger(__name__)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.metrics = EngineMetrics()
        self.dead: str | None = None
        self._error: BaseException | None = None
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._deltas = OutputDeltas()
        self._wake = threading.Event()
        self._stop = False
        self.draining = False
        self._lock = threading.Lock()        # guards _streams
        self._thread = threading.Thread(target=self._loop, name="shardline-step-loop", daemon=True)
        self._thread.start()

    # -- callers (any asyncio loop) -------------------------------------------------------

    async def generate(self, prompt: str | list[int], params: SamplingParams | None, request_id: str,
                       prompt_text: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield delta `RequestOutput`s of one request until it finishes; abort it if left early.

        Raises at once (before anything is yielded) for a prompt that can never run
        (`PromptTooLongError`, `ValueError`), and `EngineDeadError` when the engine dies.
        """
        self._check_alive()
        if self.draining:
            raise EngineDrainingError("the engine is shutting down and accepts no new requests; retry on "
                                      "another replica or after the restart", retry_after_s=5.0)
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already running")
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
        finished = False
        try:
            self.engine.add_request(request_id, prompt, params, prompt_text=prompt_text)
            self.metrics.started(request_id)
            self._wake.set()
            while not finished:
                batch, error = _drain(await queue.get(), queue)
                if batch:
                    out = batch[0] if len(batch) == 1 else merge_deltas(batch)
                    finished = out.finished
                    yield out
                if error is not None:
                    raise error
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:   # left early: free its blocks at the next step
                self.engine.abort_request(request_id)
                self._wake.set()

    def abort(self, request_id: str) -> bool:
        """Abort a running request (its stream ends with finish_reason "abort"); False if unknown."""
        with self._lock:
            known = request_id in self._streams
        if known:
            self.engine.abort_request(request_id)
            self._wake.set()
        return known

    @property
    def request_ids(self) -> list[str]:
        with self._lock:
            return list(self._streams)

    def snapshot(self) -> dict:
        """Metrics (see `scheduler.metrics`) plus whether the engine is alive."""
        snap = self.metrics.snapshot(self.engine)
        snap["dead"] = self.dead
        snap["draining"] = self.draining
        return snap

    def drain(self, timeout_s: float, poll_s: float = 0.05) -> dict:
        """Admit nothing new; give running requests up to `timeout_s` to finish; abort the rest.

        Blocks (call it off the event loop); returns {"in_flight", "finished", "aborted"} counts.
        An aborted request's stream ends with finish_reason "abort", like any abort."""
        self.draining = True
        in_flight = self.engine.get_num_unfinished_requests()
        deadline = time.monotonic() + timeout_s
        while self.engine.has_unfinished_requests() and self._error is None and time.monotonic() < deadline:
            time.sleep(poll_s)
        left = self.engine.get_num_unfinished_requests()
        if left and self._error is None:
            for rid in self.engine.unfinished_request_ids():
                self.engine.abort_request(rid)
            self._wake.set()
            stop_by = time.monotonic() + 30.0    # aborts land at the next step
            while self.engine.has_unfinished_requests() and self._error is None and time.monotonic() < stop_by:
                time.sleep(poll_s)
        return {"in_flight": in_flight, "finished": in_flight - left, "aborted": left}

    def shutdown(self) -> None:
        """Stop the step loop (the caller releases the executor)."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)

    # -- the step loop (its own thread) ---------------------------------------------------

    def _loop(self) -> None:
        while not self._stop:
            if not self.engine.has_unfinished_requests():
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except BaseException as exc:   # noqa: BLE001 - a dead engine must reach every caller
                self._die(exc)
                return
            for out in outputs:
                self._deliver(self._deltas.delta(out))

    def _deliver(self, out: RequestOutput) -> None:
        self.metrics.observe(out)
        with self._lock:
            target = self._streams.get(out.request_id)
        if target is not None:
            loop, queue = target
            _put(loop, queue, out)

    def _die(self, exc: BaseException) -> None:
        logger.error("the engine step loop failed: %s", exc)
        self.dead = str(exc) or type(exc).__name__
        self._error = exc if isinstance(exc, EngineDeadError) else EngineDeadError(self.dead)
        with self._lock:
            targets = list(self._streams.values())
        for loop, queue in targets:
            _put(loop, queue, self._error)

    def _check_alive(self) -> None:
        if self._error is not None:
            raise self._error


def _drain(first, queue: asyncio.Queue) -> tuple[list[RequestOutput], BaseException | None]:
    """`first` plus every delta already queued behind it: a slow reader gets one merged output per
    read instead of one per step, so the per-message cost of the transport (Serve streaming,
    SSE) stops growing with the number of steps it fell behind."""
    batch, item = [], first
    while True:
        if isinstance(item, BaseException):
            return batch, item
        batch.append(item)
        if item.finished or queue.empty():
            return batch, None
        item = queue.get_nowait()


def _put(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item) -> None:
    try:
        loop.call_soon_threadsafe(queue.put_nowait, item)
    except RuntimeError:   # the caller's loop is closed: nobody is listening any more
        pass
