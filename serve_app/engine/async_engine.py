"""Drives a BatchEngine on its own thread and streams results to asyncio callers.

Compute never blocks the event loop (it runs on one worker thread); callers
submit groups of requests and read back, per engine step, the outputs of their
group as one list: one message per step per group, whatever the batch size.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable

import torch

from serve_app.engine.batch_engine import BatchEngine
from serve_app.engine.pacing import PacedReader
from serve_app.engine.types import GenerationRequest, SequenceOutput, coalesce

logger = logging.getLogger(__name__)

Sink = Callable[[list[SequenceOutput]], None]


class AsyncEngine:
    """`build` makes the BatchEngine (load the model, allocate the cache) on the engine
    thread itself, so that thread is the only one in the process that ever runs torch.

    Why: libgomp keeps one worker pool per thread that has entered a parallel region,
    and once the process has more OpenMP threads than cores it stops spinning between
    regions and sleeps instead. A model loaded on the replica's thread and stepped on
    this one left 2 masters + 2 workers on 2 cores: small decode matmuls took 3x longer
    (191 vs 61 us) and a replica stepped at the speed of one thread. Passing a built
    BatchEngine still works (tests), at that cost.
    """

    def __init__(self, build: Callable[[], BatchEngine] | BatchEngine, stream_interval_s: float = 0.0):
        self.stream_interval_s = stream_interval_s
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}  # request_id -> its group's sink (worker thread only)
        self._wakeup = threading.Event()
        self._stopped = False
        self.num_sequences = 0  # waiting + running, as of the last step (read by stats)
        self.num_running = 0
        self.steps = 0
        self.step_seconds = 0.0  # wall time inside engine steps, summed (stats: mean step time)
        self.step_tokens = 0  # tokens those steps computed (decode rows + prompt chunks)
        # (tokens, rows, seconds) of recent steps, appended here and drained by whoever exports
        # metrics (deque appends and pops are thread-safe); bounded if nobody drains.
        self.step_log: collections.deque[tuple[int, int, float]] = collections.deque(maxlen=10_000)
        # OpenMP's thread count is per thread: a new thread starts from OMP_NUM_THREADS
        # (Ray sets it to the actor's num_cpus), not from torch.set_num_threads on the
        # creating thread. Measured: 1.8x slower matmuls until the worker sets it itself.
        self._torch_threads = torch.get_num_threads()
        self.engine: BatchEngine | None = build if isinstance(build, BatchEngine) else None
        self._build_error: BaseException | None = None
        built = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(build, built), name="engine", daemon=True)
        self._thread.start()
        built.wait()
        if self._build_error is not None:
            raise self._build_error

    # ------------------------------------------------------------ asyncio side

    async def stream(self, requests: list[GenerationRequest]) -> AsyncIterator[list[SequenceOutput]]:
        """Yield lists of outputs for these requests until each has finished.

        Closing or cancelling the iterator cancels whatever is still unfinished.
        """
        channel = OutputChannel(self)
        channel.submit(requests)
        try:
            while channel.pending:
                yield await channel.next()
        finally:
            channel.close()

    def stats(self) -> dict:
        """The engine's counters and what this driver measured of its steps."""
        return {
            **self.engine.stats(),
            "engine_sequences": self.num_sequences,
            "running_sequences": self.num_running,
            "engine_steps": self.steps,
            "engine_step_ms_mean": 1000 * self.step_seconds / max(1, self.steps),
            "engine_tokens_per_step_mean": self.step_tokens / max(1, self.steps),
        }

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def cancel(self, request_ids) -> None:
        self._send(("cancel", list(request_ids), None))

    def shutdown(self) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout=10)

    def _send(self, command) -> None:
        self._commands.put(command)
        self._wakeup.set()

    # ------------------------------------------------------------ worker thread

    def _run(self, build, built: threading.Event) -> None:
        torch.set_num_threads(self._torch_threads)
        try:
            if self.engine is None:
                self.engine = build()
        except BaseException as e:  # handed to the constructor, which raises it
            self._build_error = e
            return
        finally:
            built.set()
        while not self._stopped:
            self._apply_commands()
            if not self.engine.has_work:
                self._wakeup.wait()
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
                engine = self.engine
                self.step_seconds += engine.last_step_seconds
                self.step_tokens += engine.last_step_tokens
                self.step_log.append((engine.last_step_tokens, engine.last_step_rows, engine.last_step_seconds))
            except Exception as e:  # never leave a caller hanging on a failed step
                logger.exception("engine step failed; failing the sequences in flight")
                outputs = self.engine.abort_all(f"generation failed: {type(e).__name__}: {e}")
            self.steps += 1
            self.num_sequences = self.engine.num_sequences
            self.num_running = len(self.engine.running)
            self._deliver(outputs)

    def _apply_commands(self) -> None:
        while True:
            try:
                kind, payload, sink = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                for request in payload:
                    try:
                        self.engine.add(request)
                        self._sinks[request.request_id] = sink
                    except ValueError as e:
                        sink([SequenceOutput(request.request_id, finish_reason="error", error=str(e),
                                             prompt_tokens=len(request.prompt_token_ids))])
            else:
                for request_id in payload:
                    self.engine.cancel(request_id)
            self.num_sequences = self.engine.num_sequences

    def _deliver(self, outputs: list[SequenceOutput]) -> None:
        by_sink: dict[Sink, list[SequenceOutput]] = {}
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is None:
                continue
            by_sink.setdefault(sink, []).append(out)
            if out.finished:
                del self._sinks[out.request_id]
        for sink, outs in by_sink.items():
            sink(outs)


class OutputChannel:
    """The outputs of any number of requests, delivered to one asyncio consumer as one
    (coalesced, paced) list per engine step: the cost per step is one message, not one
    per request."""

    def __init__(self, engine: AsyncEngine):
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._inbox: asyncio.Queue[list[SequenceOutput]] = asyncio.Queue()
        self._reader = PacedReader(self._inbox, engine.stream_interval_s)
        self.pending: set[str] = set()  # submitted and not finished

    def _sink(self, outputs: list[SequenceOutput]) -> None:  # called on the engine thread
        self._loop.call_soon_threadsafe(self._inbox.put_nowait, outputs)

    def submit(self, requests: list[GenerationRequest]) -> None:
        self.pending.update(r.request_id for r in requests)
        self._engine._send(("add", requests, self._sink))

    async def next(self) -> list[SequenceOutput]:
        """The outputs that arrived since the last call (waits for at least one)."""
        batch = coalesce([out for step in await self._reader.next_batch() for out in step])
        for out in batch:
            if out.finished:
                self.pending.discard(out.request_id)
        return batch

    def close(self) -> None:
        """Cancel whatever is still unfinished."""
        if self.pending:
            self._engine.cancel(self.pending)
            self.pending = set()
