"""The logits-processor mechanism: each kind batched over its rows, the host-token needs each declares, replay
on a resumed request, and min_tokens yielding to a grammar that allows nothing but a stop token."""

from __future__ import annotations

import torch

from tokenmill.outputs import NewRequestData
from tokenmill.sample.logits_processor import (
    LogitsProcessor,
    MinTokensProcessor,
    PenaltiesProcessor,
    logits_processor_classes,
    needs_output_tokens,
)
from tokenmill.sample.sampler import Sampler
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured_output.backend import GrammarMatcher
from tokenmill.structured_output.params import StructuredOutputsParams
from tokenmill.worker.model_runner import CachedRequestState, new_request_state

EOS = 2  # not 0: a row with every token masked would be argmax'ed to 0


def state(outputs: list[int] = (), grammar: LogitsProcessor | None = None, **params) -> CachedRequestState:
    params.setdefault("max_tokens", 100)
    new = NewRequestData("r", [5, 6], list(outputs), SamplingParams(**params), [EOS], [], 0)
    s = new_request_state(new)
    if grammar is not None:
        s.logits_processors.append(grammar)
    return s


class _AllowOnly(LogitsProcessor):
    """A bitmask processor that allows a fixed set of tokens (a grammar in a known state)."""

    uses_bitmask = True

    def __init__(self, allowed: list[int]) -> None:
        self.allowed = allowed

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row].zero_()
        for t in self.allowed:
            bitmask[row, t // 32] |= 1 << (t % 32)

    def accept_token(self, token_id: int) -> bool:
        return token_id in self.allowed

    def rollback(self, num_tokens: int) -> None:
        pass

    def reset(self) -> None:
        pass


def greedy(logits: list[list[float]], rows: list[CachedRequestState]) -> list[int]:
    return Sampler(torch.Generator().manual_seed(0)).sample(torch.tensor(logits), rows).token_ids.tolist()


def test_each_feature_is_a_processor_and_says_whether_it_needs_host_tokens():
    assert logits_processor_classes(SamplingParams()) == []
    assert not needs_output_tokens(SamplingParams(temperature=0.5, seed=3, logprobs=2))
    spec = StructuredOutputsParams(regex="a+")
    params = SamplingParams(presence_penalty=0.5, min_tokens=2, structured_outputs=spec)
    assert logits_processor_classes(params) == [PenaltiesProcessor, MinTokensProcessor, GrammarMatcher]
    assert needs_output_tokens(params)
    assert needs_output_tokens(SamplingParams(min_tokens=1))


def test_processors_apply_per_row_in_a_mixed_batch():
    """Penalised, min_tokens, constrained and plain rows in one batch each get exactly their own processing."""
    logits = [[1.0, 3.0, 0.0, 2.5, 0.5]] * 4
    rows = [
        state(outputs=[1], temperature=0, frequency_penalty=1.0),  # 3.0 - 1 = 2.0 < 2.5: token 3
        state(temperature=0, min_tokens=2),  # EOS is not the top one anyway: token 1
        state(temperature=0, grammar=_AllowOnly([2, 4])),  # only 2 and 4 allowed: token 4
        state(temperature=0),  # plain: token 1
    ]
    assert greedy(logits, rows) == [3, 1, 4, 1]
    # Each alone gives the same.
    assert [greedy([logits[0]], [r])[0] for r in rows] == [3, 1, 4, 1]


def test_min_tokens_masks_eos_until_reached_and_replays_on_resume():
    logits = [[1.0, 2.0, 3.0]]
    assert greedy(logits, [state(temperature=0, min_tokens=2)]) == [1]
    # A resumed request's processors accept its output so far: two tokens, min_tokens is reached.
    resumed = state(outputs=[1, 1], temperature=0, min_tokens=2)
    assert greedy(logits, [resumed]) == [EOS]
    assert resumed.append_token(EOS) == (False, None)


def test_min_tokens_yields_when_the_grammar_allows_only_a_stop_token():
    """EOS banned by min_tokens, and the grammar allows EOS alone: the grammar wins, EOS is sampled (a row
    with every token masked would otherwise be sampled as token 0 whatever it is)."""
    logits = [[-1.0, 2.0, 3.0, 0.0]]
    row = state(temperature=0, min_tokens=5, grammar=_AllowOnly([EOS]))
    assert greedy(logits, [row]) == [EOS]
    # With something else allowed, min_tokens holds.
    row = state(temperature=0, min_tokens=5, grammar=_AllowOnly([EOS, 3]))
    assert greedy(logits, [row]) == [3]


def test_a_refused_token_ends_the_sequence_with_an_error():
    row = state(temperature=0, grammar=_AllowOnly([3]))
    ended, error = row.append_token(2)
    assert ended and "_AllowOnly refused sampled token 2" in error
