"""Executors: how the engine core reaches its worker(s).

    UniProcExecutor    the Worker in the engine's own process (the default; distributed_executor_backend="uni")
    MultiprocExecutor  one Worker per rank, each in a spawned child process (distributed_executor_backend="mp");
                       every call crosses a pipe per rank as msgpack bytes (serial.py): the SchedulerOutput
                       in, the ModelRunnerOutput out (from the output rank). Tensor and pipeline
                       parallelism run tensor_parallel_size * pipeline_parallel_size of them, joined in process
                       groups (tokenmill/distributed).
    RayDistributedExecutor  one Worker per rank, each in a Ray actor placed on a Ray cluster's nodes
                       (distributed_executor_backend="ray", ray_executor.py); the same msgpack messages travel as
                       actor method calls.

Both follow one contract (Executor): start-up in one direction (determine_kv_cache_sizing, then
initialize_cache), then launch(SchedulerOutput) / collect() -> ModelRunnerOutput, collected in launch order.
A launch returns without waiting for the step (async scheduling launches step N+1 before collecting N).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import traceback
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tokenmill.config import EngineConfig
from tokenmill.distributed import destroy_distributed
from tokenmill.model.registry import DecoderSpec
from tokenmill.outputs import ModelRunnerOutput, SchedulerOutput
from tokenmill.worker.serial import MsgpackDecoder, MsgpackEncoder
from tokenmill.worker.worker import KVCacheSizing, Worker, freeze_gc_heap

if TYPE_CHECKING:
    from tokenmill.worker.model_runner import GrammarFactory

EXECUTOR_BACKENDS = ("uni", "mp", "ray")


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


# What engine_facts() lists of every rank under "ranks": where it sits and its share of the memory.
RANK_FACT_KEYS = ("rank", "device", "weight_bytes", "kv_cache_bytes", "pp_rank", "layers", "pipeline_busy_seconds")


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
    if config.model.device == "cuda" and config.world_size > 1 and config.world_size > torch.cuda.device_count():
        raise ValueError(
            f"tensor_parallel_size * pipeline_parallel_size = {config.world_size} ranks need {config.world_size} GPUs, "
            f"but {torch.cuda.device_count()} are visible: lower tensor_parallel_size (or pipeline_parallel_size), or "
            "make more GPUs visible (CUDA_VISIBLE_DEVICES)"
        )
    if config.tensor_parallel_size > 1:
        # Checked here too, so that a bad size is reported before any worker process starts.
        from tokenmill.model.loader import read_hf_config
        from tokenmill.worker.worker import check_tensor_parallel_size

        check_tensor_parallel_size(read_hf_config(model_dir), config.tensor_parallel_size,
                                   str(Path(model_dir) / "config.json"), config.model.quantization)
    if config.pipeline_parallel_size > 1:
        from tokenmill.model.loader import read_hf_config
        from tokenmill.worker.worker import check_pipeline_parallel_size

        check_pipeline_parallel_size(read_hf_config(model_dir), config.pipeline_parallel_size,
                                     str(Path(model_dir) / "config.json"))
    if backend == "uni":
        return UniProcExecutor(config, model_dir, show_progress, grammar_factory)
    if backend == "mp":
        return MultiprocExecutor(config, model_dir)
    if backend == "ray":
        from tokenmill.worker.ray_executor import RayDistributedExecutor

        return RayDistributedExecutor(config, model_dir)
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
    """A worker process (or Ray actor) failed (its traceback is in the message) or died (its rank and exit code
    are)."""


@dataclass
class _WorkerHandle:
    rank: int
    process: multiprocessing.process.BaseProcess
    conn: Connection


class MultiprocExecutor(Executor):
    """One Worker process per rank (tensor_parallel_size * pipeline_parallel_size of them), each driven over its
    own pipe with msgpack-encoded messages; the ranks join their process groups over a free loopback port.

    Every request goes to every rank ([method, argument], encoded once); the answer that counts comes from the
    output rank (tp rank 0 of the last pipeline stage), the others' are checked for errors. Processes answer
    determine_kv_cache_sizing, initialize_cache, collect, engine_facts and set_step_timing with ["ok", value] or
    ["error", traceback]; launch is not answered: a failed launch is reported by the next collect.

    While it waits for answers the executor also watches every process's sentinel: a rank that dies (killed, or
    crashed in native code) leaves its peers blocked in a collective, so the executor kills them all and raises
    WorkerProcessError naming the dead rank and its exit code.
    """

    def __init__(self, config: EngineConfig, model_dir: Path) -> None:
        from tokenmill.distributed import get_open_port, output_rank

        self._encoder = MsgpackEncoder()
        self._decoder = MsgpackDecoder()
        self.world_size = config.world_size
        self.output_rank = output_rank(config.tensor_parallel_size, config.pipeline_parallel_size)
        init_method = f"tcp://127.0.0.1:{get_open_port()}" if self.world_size > 1 else None
        context = multiprocessing.get_context("spawn")
        self._workers: list[_WorkerHandle] = []
        for rank in range(self.world_size):
            conn, child_conn = context.Pipe(duplex=True)
            process = context.Process(
                target=run_worker_process, args=(child_conn, config, str(model_dir), rank, rank, init_method),
                name=f"tokenmill-worker-{rank}", daemon=True,
            )
            process.start()
            child_conn.close()
            self._workers.append(_WorkerHandle(rank, process, conn))
        # Pipeline parallelism: the last stage's ranks, and the others; steps launched and not collected; a launch
        # the last stage gets after the next collect (see launch).
        tp = config.tensor_parallel_size
        self._pipeline_parallel_size = config.pipeline_parallel_size
        self._last_stage = self._workers[self.world_size - tp :]
        self._earlier_stages = self._workers[: self.world_size - tp]
        self._num_in_flight = 0
        self._held_launch: bytes | None = None
        # An executor dropped without shutdown() (an engine garbage-collected) leaves no process behind.
        weakref.finalize(self, _kill_processes, [w.process for w in self._workers])
        self._failed: str | None = None
        self.info = self._gather()[self.output_rank]

    @property
    def _process(self) -> multiprocessing.process.BaseProcess:
        """The output rank's process."""
        return self._workers[self.output_rank].process

    @property
    def processes(self) -> list[multiprocessing.process.BaseProcess]:
        """Every rank's process, in rank order."""
        return [w.process for w in self._workers]

    def _send(self, method: str, argument: Any = None) -> None:
        if self._held_launch is not None:
            self._send_bytes(self._held_launch, self._last_stage)  # nothing overtakes a held launch but a collect
            self._held_launch = None
        self._send_bytes(self._encoder.encode([method, argument]), self._workers)

    def _send_bytes(self, message: bytes, workers: list[_WorkerHandle]) -> None:
        if self._failed is not None:
            raise WorkerProcessError(self._failed)
        for w in self._workers:
            # A dead rank leaves the others blocked in a collective, where they no longer read their pipe: a
            # large message to one of them would block here instead of reaching _gather, which watches deaths.
            if not w.process.is_alive():
                w.process.join(timeout=5)
                raise self._fail(f"the worker process died (rank {w.rank}, exit code {w.process.exitcode})")
        for w in workers:
            try:
                w.conn.send_bytes(message)
            except (BrokenPipeError, OSError) as e:
                w.process.join(timeout=5)
                raise self._fail(f"the worker process is gone (rank {w.rank}, exit code {w.process.exitcode})") \
                    from e

    def _gather(self) -> list[Any]:
        """Every rank's answer to the request just sent, in rank order; WorkerProcessError if a rank failed or
        died (then every worker process is killed)."""
        from multiprocessing.connection import wait

        pending = {w.conn: w for w in self._workers}
        sentinels = {w.process.sentinel: w for w in self._workers}
        answers: dict[int, Any] = {}
        while pending:
            ready = wait([*pending, *sentinels])
            for item in ready:
                w = pending.pop(item, None)  # type: ignore[call-overload]
                if w is None:
                    continue
                try:
                    status, value = self._decoder.decode(w.conn.recv_bytes())
                except (EOFError, OSError):
                    w.process.join(timeout=5)
                    raise self._fail(f"the worker process died (rank {w.rank}, exit code "
                                     f"{w.process.exitcode})") from None
                if status != "ok":
                    # The other ranks may wait for this one in a collective (or in the rendezvous): stop them all.
                    raise self._fail(f"the worker process failed (rank {w.rank}):\n{value}")
                answers[w.rank] = value
            for item in ready:
                dead = sentinels.get(item)  # type: ignore[call-overload,arg-type]
                if dead is None or (dead.conn in pending and dead.conn.poll()):
                    continue  # not a process, or its last answer is still to be read
                dead.process.join(timeout=5)
                raise self._fail(f"the worker process died (rank {dead.rank}, exit code "
                                 f"{dead.process.exitcode})")
        return [answers[w.rank] for w in self._workers]

    def _fail(self, message: str) -> WorkerProcessError:
        """Kill every worker process (survivors may be blocked in a collective with the dead one) and return the
        error to raise; later calls raise it again."""
        self._failed = message
        _kill_processes([w.process for w in self._workers])
        return WorkerProcessError(message)

    def _call(self, method: str, argument: Any = None) -> Any:
        """Send a request to every rank; the output rank's answer."""
        self._send(method, argument)
        return self._gather()[self.output_rank]

    def determine_kv_cache_sizing(self) -> KVCacheSizing:
        """The blocks every rank can hold: the smallest count over the ranks (they all must agree)."""
        self._send("determine_kv_cache_sizing")
        sizings: list[KVCacheSizing] = self._gather()
        ours = sizings[self.output_rank]
        return KVCacheSizing(ours.bytes_per_block, min(s.num_blocks for s in sizings), ours.block_size)

    def initialize_cache(self, num_blocks: int, max_model_len: int) -> None:
        self._call("initialize_cache", [num_blocks, max_model_len])

    def launch(self, sched: SchedulerOutput) -> None:
        """Every rank gets the step at once, except, with pipeline parallelism and a step already in flight, the
        last stage's ranks: they get it after the collect of that step (collect()). The last stage works on the
        step in flight until it has sampled it, and would otherwise launch this step, waiting for the earlier
        stages to compute it, before it answers the collect: the engine would get each step's tokens one step
        late, and the pipeline would drain between steps."""
        if self._pipeline_parallel_size > 1 and self._num_in_flight > 0:
            if self._held_launch is not None:
                self._send_bytes(self._held_launch, self._last_stage)
            message = self._encoder.encode(["launch", sched])
            self._send_bytes(message, self._earlier_stages)
            self._held_launch = message
        else:
            self._send("launch", sched)
        self._num_in_flight += 1

    def collect(self) -> ModelRunnerOutput:
        held, self._held_launch = self._held_launch, None
        self._send_bytes(self._encoder.encode(["collect", None]), self._workers)
        if held is not None:
            self._send_bytes(held, self._last_stage)
        self._num_in_flight -= 1
        return self._gather()[self.output_rank]

    def engine_facts(self) -> dict:
        """The output rank's facts, with every rank's own (its device, weight and KV cache bytes: its share)
        under "ranks", in rank order."""
        self._send("engine_facts")
        facts = self._gather()
        out = dict(facts[self.output_rank])
        if self.world_size > 1:
            out["ranks"] = [{key: f[key] for key in RANK_FACT_KEYS} for f in facts]
        return out

    def set_step_timing(self, enabled: bool) -> None:
        self._call("set_step_timing", bool(enabled))

    def shutdown(self) -> None:
        if self._failed is None:
            message = self._encoder.encode(["shutdown", None])
            for w in self._workers:
                if w.process.is_alive():
                    try:
                        w.conn.send_bytes(message)
                    except (BrokenPipeError, OSError):
                        pass
            for w in self._workers:
                w.process.join(timeout=10)
        _kill_processes([w.process for w in self._workers])
        for w in self._workers:
            w.conn.close()


def _kill_processes(processes: list[multiprocessing.process.BaseProcess]) -> None:
    for process in processes:
        if process.is_alive():
            process.kill()
    for process in processes:
        process.join(timeout=5)


class WorkerRequestHandler:
    """The worker side of the control plane, independent of the transport: executes one request of the executor
    ([method, argument]) on a Worker. The multiprocessing executor's pipe loop drives it (run_worker_process); a
    Ray actor can hold one and call execute() from its remote method.

    Returns the value to answer with, or NO_ANSWER for launch. Only the output rank answers collect with the
    step's output; the other ranks answer None (their outputs are the same tokens, never read)."""

    NO_ANSWER = object()

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.is_output_rank = worker.parallel_config.is_output_rank
        self.launch_error: str | None = None  # the traceback of a failed launch, reported by the next answer

    def execute(self, method: str, argument: Any) -> Any:
        worker = self.worker
        if method == "launch":
            if self.launch_error is None:
                try:
                    worker.launch(argument)
                except Exception:
                    self.launch_error = traceback.format_exc()
            return self.NO_ANSWER
        if self.launch_error is not None:
            raise WorkerLaunchError(self.launch_error)
        if method == "collect":
            out = worker.collect()
            return out if self.is_output_rank else None
        if method == "engine_facts":
            return worker.engine_facts()
        if method == "set_step_timing":
            worker.set_step_timing(argument)
            return None
        if method == "determine_kv_cache_sizing":
            return worker.determine_kv_cache_sizing()
        if method == "initialize_cache":
            worker.initialize_cache(*argument)
            freeze_gc_heap()  # as the engine's process does: start-up's objects out of the collector's way
            return None
        raise ValueError(f"unknown worker method {method!r}")


class WorkerLaunchError(RuntimeError):
    """A launched step failed; its traceback is the message."""


def worker_process_name(rank: int) -> str:
    """The name a rank's process shows in ps, top and psutil (Linux keeps 15 characters of it)."""
    return f"tm-worker-{rank}"


def _set_process_name(name: str) -> None:
    """Name this process in the OS (prctl PR_SET_NAME), so that `ps -o comm` tells the ranks apart; every
    spawned worker's command line is the same. Nothing happens where prctl is missing (not Linux)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # 15: PR_SET_NAME
    except (OSError, AttributeError):
        pass


def run_worker_process(conn: Connection, config: EngineConfig, model_dir: str, rank: int = 0, local_rank: int = 0,
                       distributed_init_method: str | None = None) -> None:
    """One rank's process: build its Worker (joining the process groups), then serve the executor's messages
    until shutdown or until the executor is gone."""
    _set_process_name(worker_process_name(rank))
    encoder, decoder = MsgpackEncoder(), MsgpackDecoder()

    def answer(status: str, value: Any = None) -> None:
        conn.send_bytes(encoder.encode([status, value]))

    try:
        manager = _GrammarCompiler(config, Path(model_dir))
        worker = Worker(config, Path(model_dir), show_progress=False, grammar_factory=manager, rank=rank,
                        local_rank=local_rank, distributed_init_method=distributed_init_method)
        manager.vocab_size = worker.spec.vocab_size
    except Exception:
        answer("error", traceback.format_exc())
        return
    answer("ok", WorkerInfo.of(worker))
    handler = WorkerRequestHandler(worker)
    while True:
        try:
            method, argument = decoder.decode(conn.recv_bytes())
        except EOFError:
            return  # the engine is gone
        if method == "shutdown":
            # Nothing is left to save: skip the interpreter's teardown (torch's and gloo's native destructors
            # take seconds), which would hold up the engine's shutdown.
            destroy_distributed()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        try:
            value = handler.execute(method, argument)
        except WorkerLaunchError as e:
            answer("error", str(e))
        except Exception:
            answer("error", traceback.format_exc())
        else:
            if value is not WorkerRequestHandler.NO_ANSWER:
                answer("ok", value)


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
