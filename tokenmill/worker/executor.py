"""Executors: how the engine core reaches its worker(s).

    UniProcExecutor    the Worker in the engine's own process (the default; distributed_executor_backend="uni")
    MultiprocExecutor  the Worker in a spawned child process (distributed_executor_backend="mp"); every call
                       crosses a pipe as msgpack bytes (serial.py): the SchedulerOutput in, the
                       ModelRunnerOutput out. This is the shape tensor parallelism takes (one process per
                       device); today it runs one worker.

Both follow one contract (Executor): start-up in one direction (determine_kv_cache_sizing, then
initialize_cache), then launch(SchedulerOutput) / collect() -> ModelRunnerOutput, collected in launch order.
A launch returns without waiting for the step (async scheduling launches step N+1 before collecting N).
"""

from __future__ import annotations

import multiprocessing
import traceback
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tokenmill.config import EngineConfig
from tokenmill.model.registry import DecoderSpec
from tokenmill.outputs import ModelRunnerOutput, SchedulerOutput
from tokenmill.worker.serial import MsgpackDecoder, MsgpackEncoder
from tokenmill.worker.worker import KVCacheSizing, Worker, freeze_gc_heap

if TYPE_CHECKING:
    from tokenmill.worker.model_runner import GrammarFactory

EXECUTOR_BACKENDS = ("uni", "mp")


@dataclass
class WorkerInfo:
    """What the engine core learns from its worker at start-up."""

    device: str
    dtype: str  # "bfloat16", "float32", ...
    spec: DecoderSpec
    max_num_batched_tokens: int

    @classmethod
    def of(cls, worker: Worker) -> WorkerInfo:
        return cls(str(worker.device), str(worker.dtype).removeprefix("torch."), worker.spec,
                   worker.max_num_batched_tokens)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


class Executor(ABC):
    info: WorkerInfo

    @abstractmethod
    def determine_kv_cache_sizing(self) -> KVCacheSizing: ...

    @abstractmethod
    def initialize_cache(self, num_blocks: int, max_model_len: int) -> None: ...

    @abstractmethod
    def launch(self, sched: SchedulerOutput) -> None:
        """Start a step; returns before it has run on an accelerator or in another process."""

    @abstractmethod
    def collect(self) -> ModelRunnerOutput:
        """The output of the oldest launched step, waiting for it."""

    @abstractmethod
    def engine_facts(self) -> dict:
        """The worker's Worker.engine_facts() (after initialize_cache)."""

    @abstractmethod
    def set_step_timing(self, enabled: bool) -> None:
        """Switch the runner's per-stage step timing (ModelRunnerOutput.stage_seconds)."""

    def shutdown(self) -> None:  # noqa: B027 - nothing to release in-process
        """Release the worker(s)."""


def make_executor(config: EngineConfig, model_dir: Path, show_progress: bool = True,
                  grammar_factory: GrammarFactory | None = None) -> Executor:
    backend = config.distributed_executor_backend
    if backend == "uni":
        return UniProcExecutor(config, model_dir, show_progress, grammar_factory)
    if backend == "mp":
        return MultiprocExecutor(config, model_dir)
    raise ValueError(f"distributed_executor_backend must be one of {EXECUTOR_BACKENDS}, got {backend!r}")


class UniProcExecutor(Executor):
    """The Worker in this process: launch and collect are plain calls (no serialization)."""

    def __init__(self, config: EngineConfig, model_dir: Path, show_progress: bool = True,
                 grammar_factory: GrammarFactory | None = None) -> None:
        self.worker = Worker(config, model_dir, show_progress, grammar_factory)
        self.info = WorkerInfo.of(self.worker)

    def determine_kv_cache_sizing(self) -> KVCacheSizing:
        return self.worker.determine_kv_cache_sizing()

    def initialize_cache(self, num_blocks: int, max_model_len: int) -> None:
        self.worker.initialize_cache(num_blocks, max_model_len)

    def launch(self, sched: SchedulerOutput) -> None:
        self.worker.launch(sched)

    def collect(self) -> ModelRunnerOutput:
        return self.worker.collect()

    def engine_facts(self) -> dict:
        return self.worker.engine_facts()

    def set_step_timing(self, enabled: bool) -> None:
        self.worker.set_step_timing(enabled)


class WorkerProcessError(RuntimeError):
    """The worker process failed (its traceback is in the message) or died."""


class MultiprocExecutor(Executor):
    """One Worker in a spawned process, driven over a pipe with msgpack-encoded messages.

    Requests to the process are [method, argument]; it answers determine_kv_cache_sizing, initialize_cache,
    collect, engine_facts and set_step_timing with ["ok", value] or ["error", traceback]. launch is not
    answered: a failed launch is reported by the next collect.
    """

    def __init__(self, config: EngineConfig, model_dir: Path) -> None:
        self._encoder = MsgpackEncoder()
        self._decoder = MsgpackDecoder()
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe(duplex=True)
        self._process = context.Process(target=run_worker_process, args=(child_conn, config, str(model_dir)),
                                        name="tokenmill-worker", daemon=True)
        self._process.start()
        child_conn.close()
        # An executor dropped without shutdown() (an engine garbage-collected) does not leave its process behind.
        weakref.finalize(self, _kill_process, self._process)
        self.info = self._reply()

    def _send(self, method: str, argument: Any = None) -> None:
        try:
            self._conn.send_bytes(self._encoder.encode([method, argument]))
        except (BrokenPipeError, OSError) as e:
            raise WorkerProcessError(f"the worker process is gone (exit code {self._process.exitcode})") from e

    def _reply(self) -> Any:
        try:
            status, value = self._decoder.decode(self._conn.recv_bytes())
        except (EOFError, OSError) as e:
            self._process.join(timeout=5)
            raise WorkerProcessError(f"the worker process died (exit code {self._process.exitcode})") from e
        if status != "ok":
            raise WorkerProcessError(f"the worker process failed:\n{value}")
        return value

    def determine_kv_cache_sizing(self) -> KVCacheSizing:
        self._send("determine_kv_cache_sizing")
        return self._reply()

    def initialize_cache(self, num_blocks: int, max_model_len: int) -> None:
        self._send("initialize_cache", [num_blocks, max_model_len])
        self._reply()

    def launch(self, sched: SchedulerOutput) -> None:
        self._send("launch", sched)

    def collect(self) -> ModelRunnerOutput:
        self._send("collect")
        return self._reply()

    def engine_facts(self) -> dict:
        self._send("engine_facts")
        return self._reply()

    def set_step_timing(self, enabled: bool) -> None:
        self._send("set_step_timing", bool(enabled))
        self._reply()

    def shutdown(self) -> None:
        if self._process.is_alive():
            try:
                self._send("shutdown")
            except WorkerProcessError:
                pass
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        self._conn.close()


def _kill_process(process: multiprocessing.process.BaseProcess) -> None:
    if process.is_alive():
        process.kill()
        process.join(timeout=5)


def run_worker_process(conn: Connection, config: EngineConfig, model_dir: str) -> None:
    """The worker process's loop: build the Worker, then serve the executor's messages until shutdown."""
    encoder, decoder = MsgpackEncoder(), MsgpackDecoder()

    def answer(status: str, value: Any = None) -> None:
        conn.send_bytes(encoder.encode([status, value]))

    try:
        manager = _GrammarCompiler(config, Path(model_dir))
        worker = Worker(config, Path(model_dir), show_progress=False, grammar_factory=manager)
        manager.vocab_size = worker.spec.vocab_size
    except Exception:
        answer("error", traceback.format_exc())
        return
    answer("ok", WorkerInfo.of(worker))
    launch_error: str | None = None
    while True:
        try:
            method, argument = decoder.decode(conn.recv_bytes())
        except EOFError:
            return  # the engine is gone
        if method == "shutdown":
            return
        try:
            if method == "launch":
                if launch_error is None:
                    worker.launch(argument)
            elif launch_error is not None:
                answer("error", launch_error)
            elif method == "collect":
                answer("ok", worker.collect())
            elif method == "engine_facts":
                answer("ok", worker.engine_facts())
            elif method == "set_step_timing":
                worker.set_step_timing(argument)
                answer("ok")
            elif method == "determine_kv_cache_sizing":
                answer("ok", worker.determine_kv_cache_sizing())
            elif method == "initialize_cache":
                worker.initialize_cache(*argument)
                freeze_gc_heap()  # as the engine's process does: start-up's objects out of the collector's way
                answer("ok")
            else:
                answer("error", f"unknown worker method {method!r}")
        except Exception:
            if method == "launch":
                launch_error = traceback.format_exc()
            else:
                answer("error", traceback.format_exc())


class _GrammarCompiler:
    """The worker process's grammar compiler (the engine's own compiles to decide admission; this one, with
    its own cache, builds the runner's matchers). Loads the tokenizer on first use."""

    def __init__(self, config: EngineConfig, model_dir: Path) -> None:
        self.config = config
        self.model_dir = model_dir
        self.vocab_size: int | None = None
        self._manager: Any = None

    def __call__(self, params):  # StructuredOutputsParams -> GrammarMatcher
        if self._manager is None:
            from tokenmill.model.tokenizer import Tokenizer
            from tokenmill.structured_output.manager import StructuredOutputManager

            so = self.config.structured_outputs
            self._manager = StructuredOutputManager(
                Tokenizer.from_pretrained(self.model_dir), vocab_size=self.vocab_size, backend=so.backend,
                compile_timeout_s=so.compile_timeout_s,
            )
        return self._manager.compile(params).matcher()
