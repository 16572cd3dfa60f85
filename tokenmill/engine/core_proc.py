"""The engine core's side of the client contract: EngineCoreService (requests in, step outputs out) and the busy
loop of the engine core process (run_engine_core_proc).

The process loop: wait for input while idle; drain every input message (adds, aborts, utility calls); step;
send the step's EngineCoreOutputs. It exits on a SHUTDOWN message, when its parent dies, or when a step raises
(the front end then fails every request in flight with the error and stops).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import time
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
    encode_error,
)
from tokenmill.request import POOLING_SAMPLING_PARAMS, Request, RequestStatus

logger = logging.getLogger("tokenmill.engine_core")


class EngineCoreService:
    """An EngineCore behind the client contract: EngineCoreRequests in, EngineCoreOutputs (with each request's
    metrics and the scheduler's stats) out. In-process clients call it directly; the engine core process runs it
    in its loop."""

    def __init__(self, core: Any) -> None:
        self.core = core
        # request_id -> the engine's Request, until it finishes or is aborted (its metrics go out with outputs).
        self._requests: dict[str, Request] = {}
        # Requests aborted since the last outputs: their final metrics go out with the next ones.
        self._aborted: list[Request] = []

    def info(self) -> dict[str, Any]:
        """What the front end needs to know about the engine once it is up."""
        core = self.core
        return {
            "max_model_len": core.max_model_len,
            "vocab_size": core.spec.vocab_size,
            "num_kv_blocks": core.kv_sizing.num_blocks,
            "block_size": core.kv_sizing.block_size,
            "dtype": str(core.dtype).removeprefix("torch."),
            "device": core.device.type,
        }

    def add_request(self, request: EngineCoreRequest) -> None:
        if request.pooling_params is not None:
            engine_request = Request(request.request_id, request.prompt_token_ids, POOLING_SAMPLING_PARAMS,
                                     arrival_time=request.arrival_time, pooling_params=request.pooling_params)
        else:
            assert request.sampling_params is not None, "a generation request carries its SamplingParams"
            engine_request = Request(request.request_id, request.prompt_token_ids, request.sampling_params,
                                     request.eos_token_ids, request.arrival_time)
        self._requests[request.request_id] = engine_request
        self.core.add_request(engine_request)

    def abort_requests(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        for request_id in request_ids:
            request = self._requests.pop(request_id, None)
            if request is not None and status == RequestStatus.FINISHED_ABORTED:
                self._aborted.append(request)
        self.core.abort_requests(request_ids, status)

    @property
    def has_aborted(self) -> bool:
        """Whether aborted requests wait for their final metrics to go out."""
        return bool(self._aborted)

    def _take_aborted(self) -> dict:
        aborted = {request.request_id: request.metrics for request in self._aborted}
        self._aborted.clear()
        return aborted

    def idle_outputs(self) -> EngineCoreOutputs:
        """The outputs of an engine with nothing to step: its stats, and the final metrics of aborted requests."""
        return EngineCoreOutputs(scheduler_stats=self.core.scheduler_stats(), aborted=self._take_aborted())

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def step(self) -> EngineCoreOutputs:
        outputs = self.core.step()
        metrics = {}
        cumulative = {}
        for out in outputs:
            request = self._requests.get(out.request_id)
            if request is None:
                continue
            # The live object: in-process the front end snapshots it when it builds an output; across processes
            # it is serialized as it is now.
            metrics[out.request_id] = request.metrics
            if request.cumulative_logprob is not None:
                cumulative[out.request_id] = request.cumulative_logprob
            if out.finish_reason is not None:
                del self._requests[out.request_id]
        return EngineCoreOutputs(outputs, metrics, cumulative, self.core.scheduler_stats(), self._take_aborted(),
                                 time.time())

    def scheduler_stats(self):
        return self.core.scheduler_stats()

    def shutdown(self) -> None:
        """Release what the core holds outside this process's memory (a worker process of its own, if any)."""
        shutdown = getattr(self.core, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def call_utility(self, name: str, args: list) -> Any:
        """The utility calls a client may make (benchmarks switch async scheduling between runs, read the
        engine's facts and time the stages of its steps)."""
        if name == "set_async_scheduling":
            return self.core.set_async_scheduling(*args)
        if name == "reset_prefix_cache":
            return self.core.kv_cache_manager.reset_prefix_cache()
        if name == "engine_info":
            return self.core.engine_info()
        if name == "set_step_timing":
            return self.core.set_step_timing(*args)
        if name == "take_step_timings":  # plain dicts on the wire (LLMEngine rebuilds the StepTiming records)
            return [dataclasses.asdict(t) for t in self.core.take_step_timings()]
        raise ValueError(f"unknown engine utility call {name!r}")


def run_engine_core_proc(config: EngineConfig, model_dir: Path, input_address: str, output_address: str,
                         log_level: int = logging.INFO) -> None:
    """The engine core process's body (see main())."""
    import zmq

    # No engine outlives its server: the loop checks that its parent is still the same (prctl's PDEATHSIG would
    # fire when the parent *thread* that started this process ends, and servers start it from a worker thread).
    parent = os.getppid()
    # The server decides when the engine stops (after draining): a terminal's Ctrl+C or a SIGTERM sent to the
    # whole process group must not kill the engine under requests still in flight.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    context = zmq.Context(io_threads=1)
    inputs = context.socket(zmq.PULL)
    inputs.connect(input_address)
    outputs = context.socket(zmq.PUSH)
    outputs.setsockopt(zmq.LINGER, 2000)
    outputs.connect(output_address)
    encoder, decoder = MsgpackEncoder(), MsgpackDecoder()
    exit_code = 0
    try:
        from tokenmill.engine.engine_core import EngineCore

        service = EngineCoreService(EngineCore(config, model_dir, show_progress=False))
    except BaseException as e:
        logger.error("engine start-up failed: %s", e, exc_info=not isinstance(e, ValueError | OSError))
        outputs.send(encoder.encode(EngineCoreOutputType.STARTUP_FAILED, encode_error(e)))
        exit_code = 1
    else:
        outputs.send(encoder.encode(EngineCoreOutputType.READY, service.info()))
        try:
            _busy_loop(service, inputs, outputs, encoder, decoder, parent)
        except BaseException as e:
            logger.exception("the engine core failed")
            with contextlib.suppress(Exception):
                outputs.send(encoder.encode(EngineCoreOutputType.DEAD, encode_error(e)))
            exit_code = 1
        finally:
            try:
                service.shutdown()
            except Exception:
                logger.exception("the engine core did not shut down cleanly")
    outputs.close()
    inputs.close(linger=0)
    context.term()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown (thread pools of the tensor libraries): the parent waits for this exit.
    os._exit(exit_code)


def _busy_loop(service: EngineCoreService, inputs, outputs, encoder: MsgpackEncoder, decoder: MsgpackDecoder,
               parent: int) -> None:
    import zmq

    poller = zmq.Poller()
    poller.register(inputs, zmq.POLLIN)
    last_counts = (-1, -1)
    while True:
        if os.getppid() != parent:
            return
        if not service.has_unfinished_requests():
            # Idle: sleep on the input socket; wake up now and then to notice an orphaned engine.
            while not poller.poll(1000):
                if os.getppid() != parent:
                    return
        while True:
            try:
                frame = inputs.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            message_type, payload = decoder.decode(frame.buffer)
            if message_type == EngineCoreRequestType.ADD:
                for request in payload:
                    service.add_request(request)
            elif message_type == EngineCoreRequestType.ABORT:
                request_ids, status = payload
                service.abort_requests(request_ids, RequestStatus(status))
            elif message_type == EngineCoreRequestType.UTILITY:
                call_id, name, args = payload
                try:
                    result = [call_id, service.call_utility(name, args), None]
                except Exception as e:
                    result = [call_id, None, encode_error(e)]
                outputs.send(encoder.encode(EngineCoreOutputType.UTILITY_RESULT, result))
            elif message_type == EngineCoreRequestType.SHUTDOWN:
                return
        step_outputs = service.step() if service.has_unfinished_requests() else service.idle_outputs()
        stats = step_outputs.scheduler_stats
        counts = (stats.num_running, stats.num_waiting) if stats is not None else last_counts
        # Every step with outputs goes out; an empty one only when the queues changed (the stats stay current) or
        # aborted requests' final metrics are due.
        if step_outputs.outputs or step_outputs.aborted or counts != last_counts:
            outputs.send(encoder.encode_outputs(step_outputs), copy=False)
            last_counts = counts


def main() -> None:
    """`python -m tokenmill.engine.core_proc INPUT_ADDRESS OUTPUT_ADDRESS LIFE_FD LOG_LEVEL`, the pickled
    (EngineConfig, model_dir) on standard input. LIFE_FD is the write end of the parent's sentinel pipe: it stays
    open, untouched, for as long as this process lives."""
    import pickle

    input_address, output_address, _life_fd, log_level = sys.argv[1:5]
    config, model_dir = pickle.loads(sys.stdin.buffer.read())
    run_engine_core_proc(config, model_dir, input_address, output_address, int(log_level))


if __name__ == "__main__":
    main()
