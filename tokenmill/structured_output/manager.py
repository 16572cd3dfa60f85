"""Grammar compilation off the engine's step: a cache by normalised specification, compile threads, and a
per-request timeout.

The engine's use:

    manager = StructuredOutputManager(tokenizer, vocab_size=model_vocab_size, backend="auto",
                                      compile_timeout_s=10.0)
    pending = manager.submit(request.sampling_params.structured_outputs)   # at add_request; never blocks
    ...
    compiled = pending.poll()      # each step while the request waits: None while compiling,
                                   # StructuredOutputError when it failed or took longer than the timeout
    matcher = compiled.matcher()   # one per sequence (n > 1: one each); a LogitsProcessor for the sampler

A request whose grammar is not ready simply stays waiting: the others keep running. A compile that outlives
the timeout fails that request alone (StructuredOutputCompileTimeout, a 400 at the server). Its thread cannot
be interrupted (native code) and runs on, but it no longer counts against max_compile_threads, so a grammar
that hangs cannot starve the compiles queued behind it.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from tokenmill.structured_output.backend import CompiledGrammar, GrammarBackend
from tokenmill.structured_output.params import (
    BACKENDS,
    StructuredOutputCompileTimeout,
    StructuredOutputError,
    StructuredOutputsParams,
)

if TYPE_CHECKING:
    from tokenmill.model.tokenizer import Tokenizer

DEFAULT_COMPILE_TIMEOUT_S = 10.0
DEFAULT_MAX_COMPILE_THREADS = 2
DEFAULT_MAX_CACHED_GRAMMARS = 512


class PendingGrammar:
    """One request's grammar while it compiles: its shared compile future and its own deadline."""

    def __init__(self, manager: StructuredOutputManager, future: Future[CompiledGrammar], timeout_s: float):
        self._manager = manager
        self._future = future
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s

    def poll(self) -> CompiledGrammar | None:
        """The compiled grammar, or None while it compiles; raises StructuredOutputError when compiling
        failed or the deadline passed. Never blocks."""
        if self._future.done():
            return self._future.result()
        if time.monotonic() >= self.deadline:
            self._manager._timed_out(self._future)
            raise self._timeout_error()
        return None

    def result(self) -> CompiledGrammar:
        """Wait for the compiled grammar until the deadline (offline use and tests)."""
        remaining = max(0.0, self.deadline - time.monotonic())
        try:
            return self._future.result(timeout=remaining)
        except TimeoutError:
            self._manager._timed_out(self._future)
            raise self._timeout_error() from None

    def done(self) -> bool:
        """Whether poll() returns or raises without waiting any longer."""
        return self._future.done() or time.monotonic() >= self.deadline

    def _timeout_error(self) -> StructuredOutputCompileTimeout:
        return StructuredOutputCompileTimeout(
            f"structured_outputs: compiling the grammar took longer than {self.timeout_s:g} s (the compile "
            "timeout): simplify the schema, or raise --structured-outputs-compile-timeout"
        )


class StructuredOutputManager:
    """Compiles StructuredOutputsParams for one tokenizer, caches the results, hands out PendingGrammars.

    backend: "xgrammar", "guidance", or "auto": xgrammar (the fastest masks) unless the specification uses
    something xgrammar cannot enforce or parse (JSON-schema keywords such as uniqueItems or not, a Lark-only
    grammar), then llguidance. A request's own params.backend, when not "auto", overrides this.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        vocab_size: int | None = None,
        backend: str = "auto",
        compile_timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S,
        max_compile_threads: int = DEFAULT_MAX_COMPILE_THREADS,
        max_cached_grammars: int = DEFAULT_MAX_CACHED_GRAMMARS,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"structured outputs backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if not compile_timeout_s > 0:
            raise ValueError(f"compile_timeout_s must be > 0, got {compile_timeout_s!r}")
        if max_compile_threads < 1:
            raise ValueError(f"max_compile_threads must be >= 1, got {max_compile_threads!r}")
        from tokenmill.structured_output.guidance_backend import GuidanceBackend
        from tokenmill.structured_output.xgrammar_backend import XGrammarBackend

        self.backend = backend
        self.compile_timeout_s = compile_timeout_s
        self.max_cached_grammars = max_cached_grammars
        # backend name -> backend; the libraries are imported, and their tokenizer tables built, on first use
        self.backends: dict[str, GrammarBackend] = {
            "xgrammar": XGrammarBackend(tokenizer, vocab_size),
            "guidance": GuidanceBackend(tokenizer, vocab_size),
        }
        self.vocab_size = self.backends["xgrammar"].vocab_size
        self._executor = _CompileExecutor(max_compile_threads)
        self._lock = threading.Lock()
        # (backend choice, spec key) -> compile future, least recently used first
        self._cache: collections.OrderedDict[tuple[str, tuple[str, str, int]], Future[CompiledGrammar]] = (
            collections.OrderedDict()
        )
        self.num_cache_hits = 0
        self.num_compiles = 0

    def submit(self, params: StructuredOutputsParams, timeout_s: float | None = None) -> PendingGrammar:
        """Start compiling (or find the cached grammar) without blocking. The request's compile timeout
        (timeout_s, default compile_timeout_s) starts now."""
        choice = params.backend if params.backend != "auto" else self.backend
        key = (choice, params.spec_key())
        with self._lock:
            future = self._cache.get(key)
            new = future is None
            if future is not None:
                self._cache.move_to_end(key)
                self.num_cache_hits += 1
            else:
                self.num_compiles += 1
                future = self._executor.submit(lambda: self._compile(choice, params))
                self._cache[key] = future
                self._evict()
        if new:
            # Outside the lock: a compile that already finished runs the callback right here.
            future.add_done_callback(lambda f: self._forget_failure(key, f))
        return PendingGrammar(self, future, self.compile_timeout_s if timeout_s is None else timeout_s)

    def compile(self, params: StructuredOutputsParams, timeout_s: float | None = None) -> CompiledGrammar:
        """Compile (or fetch from the cache) and wait, within the timeout."""
        return self.submit(params, timeout_s).result()

    def shutdown(self) -> None:
        """Drop the cache and stop accepting compiles (running compiles finish on their own threads)."""
        with self._lock:
            self._cache.clear()
        self._executor.shutdown()

    # -- internals -------------------------------------------------------------------------------------------

    def _compile(self, choice: str, params: StructuredOutputsParams) -> CompiledGrammar:
        if choice != "auto":
            backend = self.backends[choice]
            reason = backend.unsupported_reason(params)
            if reason is not None:
                raise StructuredOutputError(f"structured_outputs.{params.kind}: {reason}")
            return backend.compile(params)
        xgrammar = self.backends["xgrammar"]
        if xgrammar.unsupported_reason(params) is not None:
            return self.backends["guidance"].compile(params)
        try:
            return xgrammar.compile(params)
        except StructuredOutputError as xgrammar_error:
            # Something only llguidance reads (its Lark extensions), or a schema xgrammar's compiler cannot
            # satisfy (minProperties beyond the named properties). When both refuse, xgrammar's message says why.
            try:
                return self.backends["guidance"].compile(params)
            except StructuredOutputError:
                raise xgrammar_error from None

    def _forget_failure(self, key: tuple[str, tuple[str, str, int]], future: Future[CompiledGrammar]) -> None:
        # A failed compile is not cached: the next request with this specification gets its own error.
        if future.exception() is not None:
            with self._lock:
                if self._cache.get(key) is future:
                    del self._cache[key]

    def _evict(self) -> None:
        # Only finished entries are evicted: an in-flight compile stays shared by the requests waiting on it.
        excess = len(self._cache) - self.max_cached_grammars
        for key in [k for k, f in self._cache.items() if f.done()][: max(0, excess)]:
            del self._cache[key]

    def _timed_out(self, future: Future[CompiledGrammar]) -> None:
        self._executor.write_off(future)


class _CompileExecutor:
    """Runs compiles on daemon threads, at most max_workers at once (a thread per compile: starting one costs
    ~0.1 ms against milliseconds to seconds of compiling).

    A compile written off after a timeout keeps its thread but frees its slot for the queue.
    """

    def __init__(self, max_workers: int):
        self.max_workers = max_workers
        self._lock = threading.Lock()
        self._queue: collections.deque[tuple[Callable[[], Any], Future[Any]]] = collections.deque()
        self._running: set[Future[Any]] = set()  # compiles holding a slot
        self._shutdown = False

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("the structured-outputs manager is shut down")
            self._queue.append((fn, future))
            self._start_queued()
        return future

    def write_off(self, future: Future[Any]) -> None:
        with self._lock:
            if future in self._running:
                self._running.discard(future)
                self._start_queued()

    def shutdown(self) -> None:
        with self._lock:
            self._shutdown = True
            for _, future in self._queue:
                future.cancel()
            self._queue.clear()

    def _start_queued(self) -> None:  # holds self._lock
        while self._queue and len(self._running) < self.max_workers:
            fn, future = self._queue.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            self._running.add(future)
            threading.Thread(
                target=self._run, args=(fn, future), name="tokenmill-grammar-compile", daemon=True
            ).start()

    def _run(self, fn: Callable[[], Any], future: Future[Any]) -> None:
        try:
            result = fn()
        except BaseException as e:
            future.set_exception(e)
        else:
            future.set_result(result)
        finally:
            with self._lock:
                self._running.discard(future)
                self._start_queued()
