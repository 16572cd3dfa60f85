"""User-facing sampling options, validated on construction (names and defaults as in vLLM)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.structured_output.params import StructuredOutputsParams

_EPS = 1e-5


@dataclass
class SamplingParams:
    # Number of completions returned for the prompt.
    n: int = 1
    # Penalize tokens that already appeared in the output (OpenAI semantics, >0 favours new tokens).
    presence_penalty: float = 0.0
    # Penalize tokens by how often they appeared in the output.
    frequency_penalty: float = 0.0
    # Divide (positive logits) or multiply (negative) logits of tokens seen in prompt or output; 1 = off.
    repetition_penalty: float = 1.0
    # 0 means greedy.
    temperature: float = 1.0
    top_p: float = 1.0
    # 0 or -1 disables top-k.
    top_k: int = 0
    min_p: float = 0.0
    # Per-request seed: the same seed gives the same draws whatever else is in the batch. The output is the
    # same too in float32 or with batch_invariant=True; in bfloat16 without it, batch mates can flip a token
    # whose top two logits are within one bfloat16 step.
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    # None: until the model's context is full (max_model_len).
    max_tokens: int | None = 16
    min_tokens: int = 0
    # Number of most likely tokens to return per output position (plus the sampled one); None = off.
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # Constrain the output to a JSON schema, a regex, a choice of strings or a grammar (vLLM's name).
    structured_outputs: StructuredOutputsParams | None = None
    _stop_list: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.stop is None:
            self._stop_list = []
        elif isinstance(self.stop, str):
            self._stop_list = [self.stop]
        else:
            self._stop_list = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if self.top_k == -1:
            self.top_k = 0
        self._validate()
        if self.temperature < _EPS:
            # Greedy: the other sampling knobs have no effect.
            self.temperature = 0.0
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    def _validate(self) -> None:
        def fail(name: str, rule: str) -> None:
            raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or self.n < 1:
            fail("n", "must be an integer >= 1")
        if not -2.0 <= self.presence_penalty <= 2.0:
            fail("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            fail("frequency_penalty", "must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 2.0:
            fail("repetition_penalty", "must be in (0, 2]")
        if not 0.0 <= self.temperature <= 2.0:
            fail("temperature", "must be in [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            fail("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            fail("top_k", "must be -1 or 0 (disabled) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            fail("min_p", "must be in [0, 1]")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            fail("seed", "must be an integer or None")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            fail("max_tokens", "must be an integer >= 1 or None")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            fail("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= 20):
                fail(name, "must be None or an integer in [0, 20]")
        if any(not isinstance(s, str) or not s for s in self._stop_list):
            raise ValueError(f"stop must be a non-empty string or a list of non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids or []):
            fail("stop_token_ids", "must be a list of non-negative integers")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError(
                "structured_outputs must be a StructuredOutputsParams (from tokenmill import "
                f"StructuredOutputsParams), got {type(self.structured_outputs).__name__}"
            )

    @property
    def stop_strings(self) -> list[str]:
        return self._stop_list

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def clone_for_child(self, index: int) -> SamplingParams:
        """The params of the index-th of n samples: one completion each, seeds offset so they differ."""
        seed = None if self.seed is None else self.seed + index
        return SamplingParams(
            n=1, presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, min_p=self.min_p, seed=seed, stop=list(self._stop_list),
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
            max_tokens=self.max_tokens, min_tokens=self.min_tokens, logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs, include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            structured_outputs=self.structured_outputs,
        )
