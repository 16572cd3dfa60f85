"""Hand-off contracts between the stages: scheduler -> runner -> engine -> user."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokenmill.model.pooler import PooledChunk
from tokenmill.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch


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
class NewRequestData:
    """A request the runner has no state for: first scheduled, or resumed after a preemption (recomputed from
    scratch: its KV was freed, so the runner rebuilds its state, logits processors replaying output_token_ids).
    Sent once; after that the request travels as CachedRequestData diffs."""

    request_id: str
    prompt_token_ids: list[int]
    # Tokens sampled before a preemption (empty for a new request): the runner appends them to the prompt.
    output_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: list[int]
    # The request's blocks in token order (prefix-cache hits first).
    block_ids: list[int]
    num_computed_tokens: int
    # How often the request was preempted so far (a pooling chunk's epoch).
    num_preemptions: int = 0
    # "MEAN" / "LAST" for a pooling request (prefill only, nothing sampled); None for generation.
    pooling_type: str | None = None
    # Prompt positions whose logprobs were reported already (a resumed request does not report them again).
    num_prompt_logprobs_done: int = 0


@dataclass
class CachedRequestData:
    """Diffs for requests the runner already holds, in parallel lists (one entry per request).

    No token ids: every input token is either in the request's NewRequestData or was sampled by the runner
    itself, which appends each sampled token to its own copy when the step is collected (with async scheduling
    the newest one is read on the device, from the step in flight)."""

    request_ids: list[str] = field(default_factory=list)
    # Blocks appended to each request's block table since it was last scheduled.
    new_block_ids: list[list[int]] = field(default_factory=list)
    # Tokens whose KV is computed before this step (the scheduler's count; the runner's must agree).
    num_computed_tokens: list[int] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    """One step's decisions, as plain data: nothing here refers to a Request or to the KV cache manager."""

    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: CachedRequestData = field(default_factory=CachedRequestData)
    # request_id -> tokens computed for it in this step (a prefill chunk, or 1 for a decode), in batch order.
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    total_num_scheduled_tokens: int = 0
    # Requests finished (stopped, aborted) since the previous step: the runner drops their state.
    finished_request_ids: list[str] = field(default_factory=list)
    # Requests preempted in this step (their blocks were freed; they come back as NewRequestData).
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


@dataclass
class SampledToken:
    token_id: int
    # Present when the request asked for logprobs.
    logprobs: PositionLogprobs | None = None
    logprob: float | None = None


@dataclass
class ModelRunnerOutput:
    # request_id -> the token sampled for it in this step (requests whose scheduled tokens reach their end).
    sampled: dict[str, SampledToken]
    # request_id -> prompt logprobs computed in this step, in prompt order (for requests asking for them).
    prompt_logprobs: dict[str, list[PositionLogprobs]] = field(default_factory=dict)
    # request_id -> this step's pooled chunk of a pooling request.
    pooled: dict[str, PooledChunk] = field(default_factory=dict)
    # request_id -> how a logits processor ended the sequence with its sampled token: None when it finished
    # (a grammar reached its end: finish "stop"), or an error message when it refused the token.
    processor_finished: dict[str, str | None] = field(default_factory=dict)
    # stage -> seconds of this step in the runner ("build_batch", "forward", "logits", "sample"), only while step
    # timing is on (EngineCore.set_step_timing): all but build_batch are device time on CUDA (CUDA events), host
    # time on CPU.
    stage_seconds: dict[str, float] | None = None


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
