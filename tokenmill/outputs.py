"""Hand-off contracts between the stages: scheduler -> runner -> engine -> user."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from tokenmill.model.pooler import PooledChunk
    from tokenmill.request import Request


@dataclass
class Logprob:
    logprob: float
    # 1 = the most likely token.
    rank: int
    decoded_token: str | None = None


# One output position: token_id -> Logprob for the chosen token and the top-k alternatives.
PositionLogprobs = dict[int, Logprob]


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    # Seconds of engine-step time attributed to this request (each step split by tokens computed).
    compute_seconds: float = 0.0
    num_cached_tokens: int = 0

    def snapshot(self) -> RequestMetrics:
        """A copy that later updates of this one do not change."""
        return RequestMetrics(self.arrival_time, self.first_scheduled_time, self.first_token_time,
                              self.last_token_time, self.finished_time, self.compute_seconds, self.num_cached_tokens)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None = None
    # The stop string or stop token id that ended the output; None for EOS or length.
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0


@dataclass
class EmbeddingOutput:
    """The pooled vector of one prompt (vLLM's EmbeddingOutput)."""

    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput:
    """The result of one pooling request (vLLM's EmbeddingRequestOutput); outputs.embedding is empty until
    finished."""

    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int]
    finished: bool
    prompt: str | None = None
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0


@dataclass
class ScheduledRequest:
    request: Request
    # Tokens computed for this request in this step (a prefill chunk, or 1 for a decode).
    num_new_tokens: int
    # Whether this step finishes the request's known tokens, so a next token is sampled.
    samples: bool


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_scheduled_tokens: int = 0
    # Requests preempted in this step (their blocks were freed; they will be recomputed).
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class SampledToken:
    token_id: int
    # Present when the request asked for logprobs.
    logprobs: PositionLogprobs | None = None
    logprob: float | None = None


@dataclass
class ModelRunnerOutput:
    # request_id -> the token sampled for it in this step (only for requests whose ScheduledRequest.samples).
    sampled: dict[str, SampledToken]
    # request_id -> prompt logprobs computed in this step, in prompt order (for requests asking for them).
    prompt_logprobs: dict[str, list[PositionLogprobs]] = field(default_factory=dict)
    # request_id -> this step's pooled chunk of a pooling request.
    pooled: dict[str, PooledChunk] = field(default_factory=dict)


@dataclass
class EngineCoreOutput:
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[PositionLogprobs] | None
    new_prompt_logprobs: list[PositionLogprobs] | None
    finish_reason: str | None
    stop_reason: int | str | None
    # A finished pooling request's vector [hidden_size] (float32, on the host); None for generation.
    pooled: torch.Tensor | None = None
    # The request failed inside the engine (finish_reason "abort"): e.g. its grammar did not compile.
    error: BaseException | None = None
