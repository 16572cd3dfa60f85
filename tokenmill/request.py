"""Request: the single truth about one sequence inside the engine."""

from __future__ import annotations

import enum
import time

from tokenmill.model.pooler import Pooler
from tokenmill.outputs import PositionLogprobs, RequestMetrics
from tokenmill.pooling_params import PoolingParams
from tokenmill.sample.logits_processor import needs_output_tokens
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured_output.request_state import StructuredOutputRequest

# A pooling request samples nothing; it carries these so that the scheduler treats it as a request whose one
# "output" is due when its prefill completes (and the scheduler and runner read no field that is not there).
POOLING_SAMPLING_PARAMS = SamplingParams(max_tokens=1, temperature=0.0)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.is_finished else None


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: frozenset[int] = frozenset(),
        arrival_time: float | None = None,
        pooling_params: PoolingParams | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        # With async scheduling: tokens sampled by a launched step whose ids have not reached the host yet (0 or
        # 1). They count as computed input of the next step, which reads them from the device.
        self.num_pending_tokens = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        # Chained hashes of this request's full blocks, extended as tokens arrive (prefix caching).
        self.block_hashes: list[bytes] = []
        self.metrics = RequestMetrics(arrival_time=time.time() if arrival_time is None else arrival_time)
        self.cumulative_logprob: float | None = 0.0 if sampling_params.logprobs is not None else None
        # Prompt logprobs gathered across prefill chunks; position 0 has none.
        self.prompt_logprobs: list[PositionLogprobs | None] | None = (
            [None] if sampling_params.prompt_logprobs is not None else None
        )
        # Whether the runner's logits processors for this request read each sampled token on the host before
        # the next step (penalties, min_tokens, a grammar): async scheduling then waits for the token.
        self.needs_output_tokens = pooling_params is None and needs_output_tokens(sampling_params)
        # Under structured outputs: the grammar while it compiles; set by the engine at add_request. (The
        # runner holds the sequence's matcher.)
        self.structured_output: StructuredOutputRequest | None = None
        # Why the request failed inside the engine (its grammar did not compile); None otherwise.
        self.error: BaseException | None = None
        # A pooling request (prefill only: its prompt's hidden states are pooled into one vector, nothing is
        # sampled) has a Pooler; a generation request has None.
        self.pooler: Pooler | None = (
            Pooler(pooling_params, len(prompt_token_ids)) if pooling_params is not None else None
        )

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def is_schedulable(self) -> bool:
        """Whether the request may be admitted: False while its grammar compiles."""
        return self.structured_output is None or self.structured_output.is_ready

    @property
    def needs_every_prompt_position(self) -> bool:
        """Whether every prompt position must be computed (no prefix-cache hits): prompt logprobs, mean pooling."""
        return self.sampling_params.prompt_logprobs is not None or (
            self.pooler is not None and self.pooler.pooling_type == "MEAN"
        )

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens})"
        )
