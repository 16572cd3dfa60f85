"""EngineCoreClient: how the front end (LLMEngine under LLM and the API server) talks to the engine core.

- InprocClient: the EngineCore runs in this process; get_output() runs one step.
- MPClient: the EngineCore runs in a child process (`python -m tokenmill.engine.core_proc`, a fresh interpreter
  that imports nothing of the caller's main module) and the two talk over ZeroMQ PUSH/PULL
  ipc:// sockets in a private temporary directory, with msgpack messages (messages.py). The core steps on its
  own; get_output() waits for the next step's outputs. A monitor thread watches the process: if it dies
  (killed, out of memory, a device error), the client turns dead within milliseconds, get_output() raises
  EngineDeadError and on_dead callbacks run.

Contract (both): add_request / abort_requests / get_output / call_utility are called from one thread at a time
(the thread that owns the LLMEngine); wake() and is_dead may be called from any thread.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import shutil
import tempfile
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.engine.messages import (
    EngineCoreOutputs,
    EngineCoreOutputType,
    EngineCoreRequest,
    EngineCoreRequestType,
    MsgpackDecoder,
    MsgpackEncoder,
    decode_error,
)
from tokenmill.request import RequestStatus

logger = logging.getLogger("tokenmill.engine_client")

# Environment variable switching LLM(...) to the multiprocess engine when multiprocess= is not given (as vLLM's
# VLLM_ENABLE_V1_MULTIPROCESSING): 1/true/yes/on or 0/false/no/off.
MULTIPROCESS_ENV = "TOKENMILL_ENGINE_MULTIPROCESS"


def multiprocess_from_env() -> bool:
    value = os.environ.get(MULTIPROCESS_ENV, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{MULTIPROCESS_ENV}={os.environ[MULTIPROCESS_ENV]!r} is not a switch: set it to 1 or 0")


class EngineDeadError(RuntimeError):
    """The engine is not running: stopped, never started, or its process died."""


class EngineCoreClient(ABC):
    """The front end's handle on an engine core. info holds what the engine reported once it was up:
    max_model_len, vocab_size, num_kv_blocks, block_size, dtype, device."""

    info: dict[str, Any]

    @staticmethod
    def make(config: EngineConfig, model_dir: Path, multiprocess: bool, tokenizer: Any = None) -> EngineCoreClient:
        return MPClient(config, model_dir) if multiprocess else InprocClient(config, model_dir, tokenizer)

    @abstractmethod
    def add_request(self, request: EngineCoreRequest) -> None: ...

    @abstractmethod
    def abort_requests(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED
                       ) -> None: ...

    @abstractmethod
    def get_output(self) -> EngineCoreOutputs | None:
        """The outputs of the next engine step; None when there were none (idle, or woken by wake())."""

    @abstractmethod
    def call_utility(self, name: str, *args: Any) -> Any:
        """Run a utility call on the engine (e.g. set_async_scheduling) and return its result."""

    def wake(self) -> None:  # noqa: B027 - nothing to wake in-process
        """Make a get_output() waiting in another thread return (new input is waiting)."""

    @property
    def is_dead(self) -> bool:
        return False

    def add_dead_callback(self, callback: Callable[[BaseException], None]) -> None:  # noqa: B027
        """callback(error) runs (on a client thread) when the engine dies; never in-process."""

    @abstractmethod
    def shutdown(self) -> None: ...

    def kill(self) -> None:  # noqa: B027 - nothing to kill in-process
        """Stop the engine at once, without a goodbye (the server's immediate exit)."""


class InprocClient(EngineCoreClient):
    """The engine core in this process, stepped by get_output()."""

    def __init__(self, config: EngineConfig, model_dir: Path, tokenizer: Any = None, show_progress: bool = True
                 ) -> None:
        from tokenmill.engine.core_proc import EngineCoreService
        from tokenmill.engine.engine_core import EngineCore

        self.service = EngineCoreService(EngineCore(config, model_dir, show_progress, tokenizer=tokenizer))
        self.info = self.service.info()

    @property
    def core(self):
        """The EngineCore itself (engine tests only: its internals are not part of the contract)."""
        return self.service.core

    def add_request(self, request: EngineCoreRequest) -> None:
        self.service.add_request(request)

    def abort_requests(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED
                       ) -> None:
        self.service.abort_requests(request_ids, status)

    def get_output(self) -> EngineCoreOutputs | None:
        if not self.service.has_unfinished_requests():
            return self.service.idle_outputs()
        return self.service.step()

    def call_utility(self, name: str, *args: Any) -> Any:
        return self.service.call_utility(name, list(args))

    def shutdown(self) -> None:
        """Release the core's workers (processes or Ray actors of its executor, if any)."""
        self.service.shutdown()


class MPClient(EngineCoreClient):
    """The engine core in a child process (see the module docstring)."""

    def __init__(self, config: EngineConfig, model_dir: Path, startup_timeout: float | None = None) -> None:
        import zmq

        self._encoder, self._decoder = MsgpackEncoder(), MsgpackDecoder()
        self._dir = tempfile.mkdtemp(prefix="tokenmill-engine-")
        self._context = zmq.Context(io_threads=1)
        self._input = self._context.socket(zmq.PUSH)
        self._output = self._context.socket(zmq.PULL)
        self._dead_error: BaseException | None = None
        self._dead_callbacks: list[Callable[[BaseException], None]] = []
        self._lock = threading.Lock()
        self._closed = False
        # Requests added since the last flush (sent together, see add_request).
        self._adds: list[EngineCoreRequest] = []
        # Step outputs received while waiting for a utility call's answer.
        self._pending: deque[EngineCoreOutputs] = deque()
        self._call_ids = itertools.count()
        input_address, output_address = f"ipc://{self._dir}/input", f"ipc://{self._dir}/output"
        self._input.bind(input_address)
        self._output.bind(output_address)
        # Written by wake() and by the monitor; read by get_output()'s poll.
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self.proc = EngineProcess(config, Path(model_dir), input_address, output_address)
        try:
            # The engine ignores SIGTERM (see core_proc.py): at exit it is told to stop, or killed.
            atexit.register(self.shutdown)
            self.info = self._wait_ready(startup_timeout)
        except BaseException:
            self.shutdown()
            raise
        self._poller = zmq.Poller()
        self._poller.register(self._output, zmq.POLLIN)
        self._poller.register(self._wake_read, zmq.POLLIN)
        self._monitor = threading.Thread(target=self._watch, name="tokenmill-engine-monitor", daemon=True)
        self._monitor.start()

    # ---- start-up and death -----------------------------------------------------------------------------------
    def _wait_ready(self, timeout: float | None) -> dict[str, Any]:
        """Wait for READY (its info) or STARTUP_FAILED (raised as the engine's own error)."""
        import zmq

        poller = zmq.Poller()
        poller.register(self._output, zmq.POLLIN)
        poller.register(self.proc.sentinel, zmq.POLLIN)
        waited = 0.0
        while True:
            events = dict(poller.poll(200))
            if self._output in events:
                message_type, payload = self._decoder.decode(self._output.recv())
                if message_type == EngineCoreOutputType.READY:
                    return payload
                if message_type == EngineCoreOutputType.STARTUP_FAILED:
                    self.proc.join(10)
                    raise decode_error(payload)
                continue
            if not self.proc.is_alive():
                self.proc.join()
                raise EngineDeadError(
                    f"the engine process exited with status {self.proc.exitcode} while starting (see its log above)")
            waited += 0.2
            if timeout is not None and waited > timeout:
                raise TimeoutError(f"the engine process did not start within {timeout} s")

    def _watch(self) -> None:
        """The monitor thread: wait for the process to end; unless the client shut it down, the engine is dead."""
        self.proc.wait_sentinel()
        if self._closed:
            return
        self.proc.join(1)
        self._set_dead(EngineDeadError(f"the engine process died (exit status {self.proc.exitcode})"))

    def _set_dead(self, error: BaseException) -> None:
        with self._lock:
            if self._dead_error is not None:
                return
            self._dead_error = error
            callbacks = list(self._dead_callbacks)
        logger.error("%s", error)
        self.wake()
        for callback in callbacks:
            try:
                callback(error)
            except Exception:
                logger.exception("an engine-death callback failed")

    @property
    def is_dead(self) -> bool:
        return self._dead_error is not None

    def add_dead_callback(self, callback: Callable[[BaseException], None]) -> None:
        with self._lock:
            error = self._dead_error
            if error is None:
                self._dead_callbacks.append(callback)
        if error is not None:
            callback(error)

    def _check_alive(self) -> None:
        if self._dead_error is not None:
            raise EngineDeadError(str(self._dead_error))
        if self._closed:
            raise EngineDeadError("the engine was shut down")

    # ---- requests -----------------------------------------------------------------------------------------------
    def add_request(self, request: EngineCoreRequest) -> None:
        """Queued here and sent with the other requests added before the next wait for outputs, in one message:
        requests submitted together start in the same engine step, whatever the timing (as in-process)."""
        self._check_alive()
        self._adds.append(request)

    def _flush(self) -> None:
        if self._adds:
            adds, self._adds = self._adds, []
            self._input.send(self._encoder.encode_requests(adds), copy=False)

    def abort_requests(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED
                       ) -> None:
        if self._dead_error is not None or self._closed or not request_ids:
            return  # a dead engine holds nothing to free
        self._flush()
        self._input.send(self._encoder.encode(EngineCoreRequestType.ABORT, [list(request_ids), status.value]))

    def wake(self) -> None:
        try:
            os.write(self._wake_write, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is pending anyway) or closed

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _receive(self, block: bool) -> tuple[int, Any] | None:
        """One message from the engine; None when none is waiting (or, blocking, when woken)."""
        import zmq

        while True:
            self._check_alive()
            try:
                frame = self._output.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                if not block:
                    return None
                events = dict(self._poller.poll())
                if self._wake_read in events:
                    self._drain_wake()
                    if self._output not in events:
                        self._check_alive()
                        return None
                continue
            message_type, payload = self._decoder.decode(frame.buffer)
            if message_type == EngineCoreOutputType.DEAD:
                self._set_dead(EngineDeadError(f"the engine failed: {decode_error(payload)}"))
                continue
            return message_type, payload

    def get_output(self) -> EngineCoreOutputs | None:
        self._flush()
        if self._pending:
            return self._pending.popleft()
        message = self._receive(block=True)
        if message is None:
            return None
        message_type, payload = message
        if message_type == EngineCoreOutputType.OUTPUTS:
            return payload
        logger.warning("unexpected engine message %d ignored", message_type)
        return None

    def call_utility(self, name: str, *args: Any) -> Any:
        self._check_alive()
        self._flush()
        call_id = next(self._call_ids)
        self._input.send(self._encoder.encode(EngineCoreRequestType.UTILITY, [call_id, name, list(args)]))
        while True:
            message = self._receive(block=True)
            if message is None:
                continue
            message_type, payload = message
            if message_type == EngineCoreOutputType.OUTPUTS:
                self._pending.append(payload)
            elif message_type == EngineCoreOutputType.UTILITY_RESULT and payload[0] == call_id:
                if payload[2] is not None:
                    raise decode_error(payload[2])
                return payload[1]

    # ---- shutdown -----------------------------------------------------------------------------------------------
    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask the engine process to stop, wait for it (killing it after timeout), and release the sockets."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        proc = self.proc
        if proc.is_alive() and self._dead_error is None:
            try:
                self._input.send(self._encoder.encode(EngineCoreRequestType.SHUTDOWN, None))
            except Exception:
                pass
            proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        self.wake()
        monitor = getattr(self, "_monitor", None)
        if monitor is not None:
            monitor.join(2)  # it saw the exit: the sentinel can be closed
        self._input.close(linger=0)
        self._output.close(linger=0)
        self._context.term()
        for fd in (self._wake_read, self._wake_write, self.proc.sentinel):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._dir, ignore_errors=True)

    def kill(self) -> None:
        """Kill the engine process at once (the server's immediate exit)."""
        if self.proc.is_alive():
            self.proc.kill()


class EngineProcess:
    """The engine core's child process: `python -m tokenmill.engine.core_proc` with the config pickled on its
    standard input. sentinel is a pipe end that turns readable (end of file) when the process has exited: the
    child holds the other end and nothing else does."""

    def __init__(self, config: EngineConfig, model_dir: Path, input_address: str, output_address: str) -> None:
        import pickle
        import subprocess
        import sys

        import tokenmill

        self.sentinel, life = os.pipe()
        env = dict(os.environ)
        # The child imports this very tokenmill, wherever it was imported from.
        package_root = str(Path(tokenmill.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, "-m", "tokenmill.engine.core_proc", input_address, output_address, str(life),
               str(logging.getLogger().getEffectiveLevel())]
        try:
            self._popen = subprocess.Popen(cmd, stdin=subprocess.PIPE, pass_fds=(life,), env=env)
        finally:
            os.close(life)
        assert self._popen.stdin is not None
        try:
            self._popen.stdin.write(pickle.dumps((config, Path(model_dir))))
            self._popen.stdin.close()
        except BrokenPipeError:
            pass  # it died at once; _wait_ready reports its exit status
        self.pid = self._popen.pid

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        import subprocess

        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        if self.is_alive():
            self._popen.kill()

    def wait_sentinel(self) -> None:
        """Block until the process has exited."""
        import select

        while True:
            try:
                readable, _, _ = select.select([self.sentinel], [], [])
            except (OSError, ValueError):
                return  # closed by shutdown()
            if readable:
                return
