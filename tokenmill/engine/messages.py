"""The messages between the front end (API server, LLM) and the engine core, and their wire format.

In: EngineCoreRequest (a new request, as plain data), abort, and a few utility calls. Out: EngineCoreOutputs, one
per engine step: each request's new tokens, logprobs, finish/stop reason, error, and its metrics; the scheduler's
stats of the step; a timestamp. In-process the objects are handed over as they are; across the process boundary
they go through MsgpackEncoder / MsgpackDecoder.

Why msgpack: benchmarks/engine_transport.py measures it against pickle for the output message of a step at
batch 1 and 256 (BENCHMARKS.md); with the outputs flattened to lists of plain values, msgpack is the faster of
the two at both sizes and never executes code from the wire.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from tokenmill.metrics.stats import SchedulerStats
from tokenmill.outputs import EngineCoreOutput, Logprob, PositionLogprobs, RequestMetrics
from tokenmill.pooling_params import PoolingParams
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured_output.params import (
    StructuredOutputCompileTimeout,
    StructuredOutputError,
    StructuredOutputsParams,
)


@dataclass
class EngineCoreRequest:
    """A request as the engine core needs it: token ids, not text (the front end tokenizes)."""

    request_id: str
    prompt_token_ids: list[int]
    # Generation requests: their SamplingParams (n == 1: the front end fans n > 1 out into children).
    sampling_params: SamplingParams | None
    # The tokenizer's end-of-sequence ids (the engine has no tokenizer of its own on the request path).
    eos_token_ids: frozenset[int]
    # time.time() when the request arrived at the front end.
    arrival_time: float
    # Pooling (embedding) requests: their PoolingParams, with the pooling type resolved.
    pooling_params: PoolingParams | None = None


@dataclass
class EngineCoreOutputs:
    """What one engine step produced."""

    outputs: list[EngineCoreOutput] = field(default_factory=list)
    # request_id -> its metrics after this step (times, compute seconds, cached tokens), for every request in
    # outputs.
    metrics: dict[str, RequestMetrics] = field(default_factory=dict)
    # request_id -> the sum of its sampled tokens' logprobs so far (requests asking for logprobs).
    cumulative_logprobs: dict[str, float] = field(default_factory=dict)
    scheduler_stats: SchedulerStats | None = None
    # request_id -> final metrics of the requests aborted since the previous message (the steps that were under
    # way when the abort came are charged to them too).
    aborted: dict[str, RequestMetrics] = field(default_factory=dict)
    # time.time() when the step's outputs were ready (every output's token time).
    timestamp: float = field(default_factory=time.time)


class EngineCoreRequestType(enum.IntEnum):
    ADD = 0
    ABORT = 1
    # Utility calls: (name, args) answered by an UTILITY_RESULT message.
    UTILITY = 2
    SHUTDOWN = 3


class EngineCoreOutputType(enum.IntEnum):
    """Numbered apart from EngineCoreRequestType: one decoder reads both directions."""

    # The engine is up: a dict of what the front end needs (max_model_len, vocab size, KV cache sizing).
    READY = 10
    # Start-up failed: (exception type name, message).
    STARTUP_FAILED = 11
    OUTPUTS = 12
    UTILITY_RESULT = 13
    # The engine loop failed after start-up: (exception type name, message); the process exits.
    DEAD = 14


# ---- errors as (type, message) ------------------------------------------------------------------------------
class EngineCoreError(RuntimeError):
    """An error raised inside the engine core process, of a type the front end does not rebuild."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}" if type_name not in ("RuntimeError", "") else message)
        self.type_name = type_name
        self.message = message


# Exception types rebuilt as themselves on the front end (the server maps ValueError to 400, and so on).
_ERROR_TYPES: dict[str, type[BaseException]] = {
    cls.__name__: cls
    for cls in (StructuredOutputCompileTimeout, StructuredOutputError, ValueError, FileNotFoundError, OSError,
                MemoryError, KeyError, TypeError, NotImplementedError)
}


def encode_error(error: BaseException) -> list[str]:
    return [type(error).__name__, str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)]


def decode_error(data: list[str]) -> BaseException:
    type_name, message = data
    cls = _ERROR_TYPES.get(type_name)
    return cls(message) if cls is not None else EngineCoreError(type_name, message)


# ---- params as plain fields ---------------------------------------------------------------------------------
def _init_fields(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}


def encode_sampling_params(params: SamplingParams) -> dict[str, Any]:
    data = _init_fields(params)
    if params.structured_outputs is not None:
        data["structured_outputs"] = _init_fields(params.structured_outputs)
    return data


def decode_sampling_params(data: dict[str, Any]) -> SamplingParams:
    data = dict(data)
    if data.get("structured_outputs") is not None:
        data["structured_outputs"] = StructuredOutputsParams(**data["structured_outputs"])
    return SamplingParams(**data)


def _encode_positions(positions: list[PositionLogprobs] | None) -> list | None:
    """[[token_ids], [logprobs], [ranks]] per position (decoded text is the front end's job)."""
    if positions is None:
        return None
    return [[list(p), [lp.logprob for lp in p.values()], [lp.rank for lp in p.values()]] for p in positions]


def _decode_positions(data: list | None) -> list[PositionLogprobs] | None:
    if data is None:
        return None
    return [{t: Logprob(lp, rank) for t, lp, rank in zip(ids, lps, ranks, strict=True)} for ids, lps, ranks in data]


def _encode_metrics(m: RequestMetrics) -> list:
    return [m.arrival_time, m.first_scheduled_time, m.first_token_time, m.last_token_time, m.finished_time,
            m.compute_seconds, m.num_cached_tokens]


_STATS_FIELDS = tuple(f.name for f in dataclasses.fields(SchedulerStats))


# ---- the wire -------------------------------------------------------------------------------------------------
class MsgpackEncoder:
    """Messages to bytes: every dataclass is flattened to lists of ints, floats and strings first."""

    def __init__(self) -> None:
        self._packer = msgpack.Packer(use_bin_type=True)

    def encode_requests(self, requests: list[EngineCoreRequest]) -> bytes:
        """New requests, added together (in one engine step's input: the batch does not depend on timing)."""
        rows = []
        for request in requests:
            pooling = request.pooling_params
            rows.append([
                request.request_id, request.prompt_token_ids,
                None if request.sampling_params is None else encode_sampling_params(request.sampling_params),
                sorted(request.eos_token_ids), request.arrival_time,
                None if pooling is None else [pooling.pooling_type, pooling.normalize],
            ])
        return self._packer.pack([EngineCoreRequestType.ADD, rows])

    def encode(self, message_type: int, payload: Any) -> bytes:
        return self._packer.pack([int(message_type), payload])

    def encode_outputs(self, outputs: EngineCoreOutputs) -> bytes:
        rows = []
        for out in outputs.outputs:
            pooled = None
            if out.pooled is not None:
                pooled = out.pooled.detach().to("cpu").float().contiguous().numpy().tobytes()
            rows.append([
                out.request_id, out.new_token_ids, _encode_positions(out.new_logprobs),
                _encode_positions(out.new_prompt_logprobs), out.finish_reason, out.stop_reason, pooled,
                None if out.error is None else encode_error(out.error),
            ])
        metrics = [[request_id, *_encode_metrics(m)] for request_id, m in outputs.metrics.items()]
        aborted = [[request_id, *_encode_metrics(m)] for request_id, m in outputs.aborted.items()]
        stats = outputs.scheduler_stats
        return self._packer.pack([
            EngineCoreOutputType.OUTPUTS, rows, metrics, outputs.cumulative_logprobs,
            None if stats is None else [getattr(stats, name) for name in _STATS_FIELDS], aborted, outputs.timestamp,
        ])


class MsgpackDecoder:
    """The inverse of MsgpackEncoder: (message type, payload), with requests and outputs rebuilt as objects."""

    def decode(self, data: bytes | memoryview) -> tuple[int, Any]:
        message = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
        message_type = message[0]
        if message_type == EngineCoreRequestType.ADD:
            return message_type, [self._request(row) for row in message[1]]
        if message_type == EngineCoreOutputType.OUTPUTS:
            return message_type, self._outputs(message)
        return message_type, message[1]

    @staticmethod
    def _request(row: list) -> EngineCoreRequest:
        request_id, token_ids, sampling, eos, arrival_time, pooling = row
        return EngineCoreRequest(
            request_id, token_ids, None if sampling is None else decode_sampling_params(sampling), frozenset(eos),
            arrival_time, None if pooling is None else PoolingParams(pooling_type=pooling[0], normalize=pooling[1]),
        )

    @staticmethod
    def _outputs(message: list) -> EngineCoreOutputs:
        _, rows, metrics, cumulative, stats, aborted, timestamp = message
        outputs = []
        for request_id, token_ids, logprobs, prompt_logprobs, finish_reason, stop_reason, pooled, error in rows:
            tensor = None
            if pooled is not None:
                import torch

                tensor = torch.from_numpy(np.frombuffer(pooled, dtype=np.float32).copy())
            outputs.append(EngineCoreOutput(
                request_id, token_ids, _decode_positions(logprobs), _decode_positions(prompt_logprobs),
                finish_reason, stop_reason, pooled=tensor, error=None if error is None else decode_error(error),
            ))
        return EngineCoreOutputs(
            outputs=outputs,
            metrics={row[0]: RequestMetrics(*row[1:]) for row in metrics},
            cumulative_logprobs=cumulative,
            scheduler_stats=None if stats is None else SchedulerStats(**dict(zip(_STATS_FIELDS, stats, strict=True))),
            aborted={row[0]: RequestMetrics(*row[1:]) for row in aborted},
            timestamp=timestamp,
        )
