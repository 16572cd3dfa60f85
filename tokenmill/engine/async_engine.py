"""AsyncLLMEngine: the engine steps in one background thread; each request reads its outputs as an async stream.

Threading contract
- Only the engine thread touches the LLMEngine. The event loop sends adds and aborts through a thread-safe
  inbox, drained before every step, so a new request joins the running batch at the next step and an aborted
  one (client gone) frees its KV blocks at the next step.
- After a step, one loop.call_soon_threadsafe hands all outputs of that step to the event loop, which puts
  each one into its request's RequestStream.
- An idle engine blocks on the inbox: no spinning. With the engine core in another process the engine thread
  is the output thread: it waits for the core's next step outputs, and the event loop wakes it when it puts a
  command into the inbox.
- If the engine core process dies, every request in flight fails with EngineDeadError at once and the
  on_dead callbacks run on the event loop (the server turns /health to 503 and exits non-zero).

Outputs are cumulative (RequestOutput.outputs[i].text holds all text so far), so a reader that falls behind
skips intermediate outputs without losing anything: the stream keeps only the latest one.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from tokenmill.engine.core_client import EngineDeadError
from tokenmill.engine.llm_engine import LLMEngine, _Parent, _PoolingParent
from tokenmill.metrics.stats import IterationStats, RequestTimings, SchedulerStats, StatLogger
from tokenmill.outputs import EmbeddingRequestOutput, RequestOutput
from tokenmill.pooling_params import PoolingParams
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger("tokenmill.async_engine")


class EngineStepError(RuntimeError):
    """An engine step failed; the requests that were in flight are aborted."""


EngineOutput = RequestOutput | EmbeddingRequestOutput


class RequestStream:
    """The latest output of one request (generation or pooling), read by a single consumer on the event loop."""

    __slots__ = ("_output", "_error", "_event", "started")

    def __init__(self) -> None:
        self._output: EngineOutput | None = None
        self._error: BaseException | None = None
        self._event = asyncio.Event()
        # Whether any output arrived (the request left the queue and finished its prefill).
        self.started = False

    def put(self, output: EngineOutput) -> None:
        self._output = output
        self.started = True
        self._event.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._event.set()

    async def get(self) -> EngineOutput:
        await self._event.wait()
        self._event.clear()
        if self._error is not None:
            raise self._error
        assert self._output is not None  # the event is set only with an output or an error
        return self._output


@dataclass
class _Add:
    request_id: str
    prompt: str | dict | list[int]
    # PoolingParams: a pooling (embedding) request.
    params: SamplingParams | PoolingParams
    arrival_time: float
    feature: str | None


@dataclass
class _Abort:
    request_id: str


_STOP = object()
# Put into the inbox when the engine core process died: the engine thread stops.
_DEAD = object()

__all__ = ["AsyncLLMEngine", "EngineDeadError", "EngineStepError", "RequestStream"]


@dataclass
class _Tracked:
    """Engine-thread bookkeeping of one in-flight request, for the per-token stats."""

    parent: _Parent | _PoolingParent  # its output() works after an abort too
    feature: str | None
    timings: RequestTimings
    num_prompt_tokens: int
    prompt_counted: bool = False


class AsyncLLMEngine:
    """Async front of an LLMEngine. Construct, then start() from a running event loop."""

    def __init__(self, engine: LLMEngine, stat_loggers: Sequence[StatLogger] = ()) -> None:
        self.engine = engine
        self.stat_loggers = list(stat_loggers)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        # request_id -> stream; owned by the event loop thread.
        self._streams: dict[str, RequestStream] = {}
        # request_id -> tracking state; owned by the engine thread.
        self._tracked: dict[str, _Tracked] = {}
        # request_id -> tracking state of an aborted request until its final metrics arrive; engine thread.
        self._aborting: dict[str, _Tracked] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        # A wake-up of the engine thread is scheduled on the event loop (_wake_engine).
        self._wake_pending = False
        # What the engine died of (None while it lives).
        self.dead_error: BaseException | None = None
        self._on_dead: list = []
        # The client's death callback: runs on its monitor thread.
        engine.engine_core.add_dead_callback(self._engine_died)

    @property
    def scheduler_stats(self) -> SchedulerStats:
        """The scheduler's stats that came with the last step's outputs; safe to read from any thread."""
        return self.engine.scheduler_stats

    # ---- lifecycle ------------------------------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return (self._thread is not None and self._thread.is_alive() and not self._stopped.is_set()
                and self.dead_error is None)

    def on_dead(self, callback) -> None:
        """callback(error) runs on the event loop if the engine (its process) dies."""
        self._on_dead.append(callback)

    def _engine_died(self, error: BaseException) -> None:
        """On the client's monitor thread: stop the engine thread, fail every request, tell the listeners."""
        self.dead_error = error
        self._inbox.put(_DEAD)
        self._call_soon(self._fail_all_streams, EngineDeadError(f"the engine died: {error}"))
        for callback in self._on_dead:
            self._call_soon(callback, error)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine loop is already started")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="tokenmill-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread (in-flight requests are aborted) and close the stat loggers."""
        if self._thread is None:
            return
        self._inbox.put(_STOP)
        self.engine.engine_core.wake()
        self._thread.join(timeout)
        self.engine.shutdown()
        for stat_logger in self.stat_loggers:
            try:
                stat_logger.close()
            except Exception:
                logger.exception("stat logger %s failed to close", type(stat_logger).__name__)

    # ---- requests (event loop side) --------------------------------------------------------------------------
    @property
    def num_in_flight(self) -> int:
        """Requests submitted and not finished yet."""
        return len(self._streams)

    @property
    def num_waiting(self) -> int:
        """Requests submitted that have no output yet (queued, or in their prefill). Counted on the event loop,
        so a request is counted from the moment generate() submits it (for admission control)."""
        return sum(1 for stream in self._streams.values() if not stream.started)

    def generate(
        self,
        request_id: str,
        prompt: str | dict | list[int],
        params: SamplingParams,
        *,
        arrival_time: float | None = None,
        feature: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its cumulative outputs until the finished one.

        Closing the iterator early (or cancelling the task reading it) aborts the request. An error raised by
        the engine for this request (e.g. ValueError for a bad prompt) is raised here.
        """
        return self._submit(request_id, prompt, params, arrival_time, feature)

    def encode(
        self,
        request_id: str,
        prompt: str | dict | list[int],
        params: PoolingParams,
        *,
        arrival_time: float | None = None,
        feature: str | None = None,
    ) -> AsyncIterator[EmbeddingRequestOutput]:
        """Submit a pooling request (vLLM's encode) and yield its one output, finished, with the vector.

        Closing the iterator early aborts the request; errors are raised here as for generate().
        """
        return self._submit(request_id, prompt, params, arrival_time, feature)

    async def _submit(self, request_id: str, prompt: str | dict | list[int], params: SamplingParams | PoolingParams,
                      arrival_time: float | None, feature: str | None) -> AsyncIterator:
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = RequestStream()
        self._streams[request_id] = stream
        self._inbox.put(_Add(request_id, prompt, params, arrival_time or time.time(), feature))
        self._wake_engine()
        finished = False
        try:
            while not finished:
                output = await stream.get()
                finished = output.finished
                yield output
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str, error: BaseException | None = None) -> None:
        """Abort a request; its blocks are freed at the next step. Unknown or finished ids are ignored.

        With an error, the request's reader gets that error (else the reader is assumed gone)."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            self._inbox.put(_Abort(request_id))
            self._wake_engine()
            if error is not None:
                stream.fail(error)

    def _wake_engine(self) -> None:
        """Wake the engine thread (waiting for the engine core's outputs) once the event loop's current round is
        over: the requests one HTTP request submits together (several prompts, n > 1 streams) then reach the
        engine core in one message and start in the same step, whatever the timing."""
        if not self._wake_pending:
            self._wake_pending = True
            assert self._loop is not None
            self._loop.call_soon(self._wake_now)

    def _wake_now(self) -> None:
        self._wake_pending = False
        self.engine.engine_core.wake()

    def abort_all(self, error: BaseException) -> int:
        """Abort every request in flight, failing each reader with error; returns how many there were."""
        request_ids = list(self._streams)
        for request_id in request_ids:
            self.abort(request_id, error)
        return len(request_ids)

    def _dispatch(self, outputs: list[RequestOutput | EmbeddingRequestOutput],
                  errors: list[tuple[str, BaseException]]) -> None:
        """Runs on the event loop: hand one iteration's results to the streams."""
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue  # aborted meanwhile
            stream.put(output)
            if output.finished:
                del self._streams[output.request_id]
        for request_id, error in errors:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream.fail(error)

    def _fail_all_streams(self, error: BaseException) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.fail(error)

    # ---- the engine thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                # Block only when there is nothing to step: an idle engine sleeps on the inbox.
                commands = self._drain(block=not self._engine_busy())
                if commands is None:
                    break
                self._iterate(commands)
        except EngineDeadError as e:  # the engine core process died
            self._call_soon(self._fail_all_streams, EngineDeadError(f"the engine died: {e}"))
        except BaseException as e:  # a bug in the loop itself: fail every waiting request, do not hang them
            logger.exception("the engine loop crashed")
            self._call_soon(self._fail_all_streams, EngineDeadError(f"the engine loop crashed: {e!r}"))
        finally:
            self._stopped.set()
            ids = list(self._tracked)
            if ids:
                self.engine.abort_request(ids)
            if self._aborting:
                stats = IterationStats(timestamp=time.time())
                self._finish_aborted(stats)
                self._log_stats(stats)
            self._call_soon(self._fail_all_streams, EngineDeadError("the engine was shut down"))

    def _engine_busy(self) -> bool:
        """Requests in flight, or a core whose last stats still show requests (aborted ones it has not let go
        of yet): its next outputs are due."""
        stats = self.engine.scheduler_stats
        return (self.engine.has_unfinished_requests() or bool(self._aborting)
                or bool(stats.num_running or stats.num_waiting))

    def _drain(self, block: bool) -> list | None:
        """The commands waiting in the inbox (waiting for one if block); None when asked to stop."""
        commands = []
        try:
            item = self._inbox.get() if block else self._inbox.get_nowait()
            while True:
                if item is _STOP:
                    return None
                if item is _DEAD:
                    raise EngineDeadError(str(self.dead_error))
                commands.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass
        return commands

    def _call_soon(self, callback, *args) -> None:
        if self._loop is None:
            return  # not started: nobody is listening yet
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _iterate(self, commands: list) -> None:
        errors: list[tuple[str, BaseException]] = []
        stats = IterationStats(timestamp=0.0)
        for command in commands:
            if isinstance(command, _Add):
                self._add(command, errors)
            else:
                self._abort(command.request_id, stats)
        outputs: list[RequestOutput | EmbeddingRequestOutput] = []
        if self._engine_busy():
            try:
                outputs = self.engine.step()
            except EngineDeadError:
                raise
            except Exception as e:
                logger.exception("engine step failed; aborting the %d requests in flight", len(self._tracked))
                error = EngineStepError(f"the engine failed while running this request: {e!r}")
                for request_id in list(self._tracked):
                    self._abort(request_id, stats)
                    errors.append((request_id, error))
        for request_id, failure in self.engine.take_errors().items():
            self._abort(request_id, stats)
            errors.append((request_id, failure))
        if self._aborting:
            self._finish_aborted(stats, self.engine.take_aborted())
        # Token times are those of the engine step that produced the tokens.
        now = self.engine.last_step_time or time.time()
        stats.timestamp = now
        for output in outputs:
            self._account(output, now, stats)
        if outputs or errors:
            self._call_soon(self._dispatch, outputs, errors)
        self._log_stats(stats)

    def _add(self, command: _Add, errors: list) -> None:
        parent: _Parent | _PoolingParent
        try:
            if isinstance(command.params, PoolingParams):
                parent = self.engine.add_pooling_request(command.request_id, command.prompt, command.params,
                                                         command.arrival_time)
            else:
                parent = self.engine.add_request(command.request_id, command.prompt, command.params,
                                                 command.arrival_time)
        except EngineDeadError:
            raise
        except Exception as e:  # ValueError for a bad prompt; it fails this request alone
            errors.append((command.request_id, e))
            return
        self._tracked[command.request_id] = _Tracked(
            parent, command.feature, RequestTimings(command.arrival_time, parent.num_samples),
            len(parent.prompt_token_ids),
        )

    def _abort(self, request_id: str, stats: IterationStats) -> None:
        tracked = self._tracked.pop(request_id, None)
        if tracked is None:
            return  # finished in the meantime (its final output is on its way) or never added
        self.engine.abort_request(request_id)
        if self.engine.is_aborting(request_id):
            # Its stats once the engine reports what the steps under way cost it (the next outputs).
            self._aborting[request_id] = tracked
        else:
            output = tracked.parent.output()
            stats.finished_requests.append(tracked.timings.finished(output, "abort", time.time(), tracked.feature))

    def _finish_aborted(self, stats: IterationStats, outputs: list | None = None) -> None:
        """Stats of aborted requests whose final metrics arrived (outputs None: all of them, as they stand)."""
        if outputs is None:
            outputs = [t.parent.output() for t in self._aborting.values()]
        for output in outputs:
            tracked = self._aborting.pop(output.request_id, None)
            if tracked is not None:
                stats.finished_requests.append(tracked.timings.finished(output, "abort", time.time(),
                                                                        tracked.feature))

    def _account(self, output: RequestOutput | EmbeddingRequestOutput, now: float, stats: IterationStats) -> None:
        tracked = self._tracked.get(output.request_id)
        if tracked is None:
            return
        num_new = tracked.timings.observe(output, now, stats)
        if num_new and not tracked.prompt_counted:
            tracked.prompt_counted = True
            stats.num_prompt_tokens += tracked.num_prompt_tokens
        if output.finished:
            del self._tracked[output.request_id]
            reason = output.outputs[0].finish_reason or "stop" if isinstance(output, RequestOutput) else "stop"
            stats.finished_requests.append(tracked.timings.finished(output, reason, now, tracked.feature))

    def _log_stats(self, stats: IterationStats) -> None:
        iteration = None if stats.is_empty else stats
        for stat_logger in self.stat_loggers:
            try:
                stat_logger.record(self.scheduler_stats, iteration)
            except Exception:
                logger.exception("stat logger %s failed", type(stat_logger).__name__)
