"""The sampler on crafted logits, no model: top-k, top-p, min-p, each penalty, and seeds."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from tokenmill.outputs import NewRequestData
from tokenmill.sample.sampler import Sampler
from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.model_runner import CachedRequestState, new_request_state


def request(prompt: list[int] | None = None, outputs: list[int] = (), eos: list[int] = (),
            **params) -> CachedRequestState:
    """A runner's row state (what the sampler reads), with `outputs` already generated."""
    params.setdefault("max_tokens", 100)
    new = NewRequestData("r", prompt or [2], list(outputs), SamplingParams(**params), list(eos), [], 0)
    return new_request_state(new)


def probs_logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs).log()[None, :]


def draw_counts(logits: torch.Tensor, num_draws: int = 400, **params) -> Counter:
    """How often each token is drawn over num_draws independent draws (one row per draw, one batch)."""
    sampler = Sampler(torch.Generator().manual_seed(0))
    rows = logits.expand(num_draws, -1).contiguous()
    ids = sampler.sample(rows, [request(**params) for _ in range(num_draws)]).token_ids
    return Counter(ids.tolist())


PROBS = [0.5, 0.3, 0.15, 0.05]


def test_unfiltered_draws_follow_the_distribution():
    counts = draw_counts(probs_logits(PROBS), num_draws=4000, temperature=1.0)
    assert set(counts) == {0, 1, 2, 3}
    for token, p in enumerate(PROBS):
        assert abs(counts[token] / 4000 - p) < 0.03


@pytest.mark.parametrize("top_k, kept", [(1, {0}), (2, {0, 1}), (3, {0, 1, 2}), (4, {0, 1, 2, 3})])
def test_top_k_keeps_the_k_most_likely(top_k, kept):
    assert set(draw_counts(probs_logits(PROBS), temperature=1.0, top_k=top_k)) == kept


@pytest.mark.parametrize("top_p, kept", [
    (0.4, {0}),            # the most likely token alone already has 0.5
    (0.8, {0, 1}),         # 0.5 + 0.3 reaches 0.8: token 2 is not needed
    (0.81, {0, 1, 2}),
    (0.96, {0, 1, 2, 3}),
])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    assert set(draw_counts(probs_logits(PROBS), temperature=1.0, top_p=top_p)) == kept


@pytest.mark.parametrize("min_p, kept", [(0.05, {0, 1, 2, 3}), (0.2, {0, 1, 2}), (0.35, {0, 1}), (0.7, {0})])
def test_min_p_drops_tokens_below_a_fraction_of_the_top(min_p, kept):
    # Threshold = min_p * 0.5 (the top probability).
    assert set(draw_counts(probs_logits(PROBS), temperature=1.0, min_p=min_p)) == kept


def test_filters_apply_per_row_in_a_mixed_batch():
    sampler = Sampler(torch.Generator().manual_seed(0))
    requests = [request(temperature=1.0, top_k=1), request(temperature=1.0, top_p=0.8),
                request(temperature=0), request(temperature=1.0, min_p=0.7)] * 50
    rows = probs_logits(PROBS).expand(len(requests), -1).contiguous()
    ids = sampler.sample(rows, requests).token_ids.tolist()
    assert {ids[i] for i in range(0, 200, 4)} == {0}
    assert {ids[i] for i in range(1, 200, 4)} == {0, 1}
    assert {ids[i] for i in range(2, 200, 4)} == {0}
    assert {ids[i] for i in range(3, 200, 4)} == {0}


def greedy_pick(logits: list[float], **params) -> int:
    sampler = Sampler(torch.Generator().manual_seed(0))
    return sampler.sample(torch.tensor([logits]), [request(temperature=0, **params)]).token_ids.item()


def test_presence_penalty_subtracts_once_per_seen_token():
    logits = [2.0, 2.5, 0.0]
    assert greedy_pick(logits, outputs=[1]) == 1
    assert greedy_pick(logits, outputs=[1], presence_penalty=0.4) == 1    # 2.1 > 2.0
    assert greedy_pick(logits, outputs=[1], presence_penalty=0.6) == 0    # 1.9 < 2.0
    # Presence counts a token once however often it appeared.
    assert greedy_pick(logits, outputs=[1, 1, 1], presence_penalty=0.4) == 1
    # The prompt is not part of it.
    assert greedy_pick(logits, prompt=[1, 1], presence_penalty=2.0) == 1


def test_frequency_penalty_grows_with_the_count():
    logits = [2.0, 2.5, 0.0]
    assert greedy_pick(logits, outputs=[1], frequency_penalty=0.3) == 1       # 2.2
    assert greedy_pick(logits, outputs=[1, 1], frequency_penalty=0.3) == 0    # 1.9
    # A negative penalty favours repeats.
    assert greedy_pick([2.5, 2.0, 0.0], outputs=[1, 1], frequency_penalty=-0.3) == 1
    assert greedy_pick(logits, prompt=[1, 1, 1], frequency_penalty=2.0) == 1


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    # Prompt tokens count as seen: 2.5 / 1.3 = 1.92 < 2.0.
    assert greedy_pick([2.0, 2.5, 0.0], prompt=[1], repetition_penalty=1.3) == 0
    assert greedy_pick([2.0, 2.5, 0.0], prompt=[1], repetition_penalty=1.2) == 1    # 2.08
    assert greedy_pick([2.0, 2.5, 0.0], outputs=[1], repetition_penalty=1.3) == 0
    # Negative logits move away from zero: -0.9 * 1.2 = -1.08 < -1.0.
    assert greedy_pick([-1.0, -0.9, -5.0], prompt=[1], repetition_penalty=1.2) == 0
    # A penalty below 1 rewards repeats.
    assert greedy_pick([2.0, 1.8, 0.0], prompt=[1], repetition_penalty=0.8) == 1


def test_min_tokens_masks_eos_and_stop_tokens():
    sampler = Sampler(torch.Generator().manual_seed(0))
    r = request([5], eos=[0], temperature=0, min_tokens=2, stop_token_ids=[1])
    assert sampler.sample(torch.tensor([[3.0, 2.0, 1.0]]), [r]).token_ids.item() == 2
    r.append_token(2)
    r.append_token(2)
    assert sampler.sample(torch.tensor([[3.0, 2.0, 1.0]]), [r]).token_ids.item() == 0


FLAT = torch.zeros(1, 1000)  # uniform over 1000 tokens: draws from different streams rarely agree


def seeded_draws(seed: int, batch_position: int = 0, num_steps: int = 8, engine_seed: int = 0) -> list[int]:
    """Tokens drawn for a request with `seed` over num_steps steps, at a given row of a batch whose other rows
    are unseeded and seeded requests of their own."""
    sampler = Sampler(torch.Generator().manual_seed(engine_seed))
    target = request(temperature=1.0, seed=seed)
    others = [request(temperature=0.7, top_p=0.9) if i % 2 else request(temperature=1.0, seed=1000 + i)
              for i in range(5)]
    batch = others[:batch_position] + [target] + others[batch_position:]
    draws = []
    for _ in range(num_steps):
        ids = sampler.sample(FLAT.expand(len(batch), -1).contiguous(), batch).token_ids
        draws.append(ids[batch_position].item())
    return draws


def test_same_seed_same_draws():
    assert seeded_draws(7) == seeded_draws(7)
    assert seeded_draws(7, engine_seed=0) == seeded_draws(7, engine_seed=123)


def test_different_seeds_differ():
    draws = [tuple(seeded_draws(seed)) for seed in range(6)]
    assert len(set(draws)) == 6


@pytest.mark.parametrize("batch_position", [1, 3, 5])
def test_seeded_draws_do_not_depend_on_batch_position(batch_position):
    alone = Sampler(torch.Generator().manual_seed(0))
    target = request(temperature=1.0, seed=7)
    draws = [alone.sample(FLAT, [target]).token_ids.item() for _ in range(8)]
    assert seeded_draws(7, batch_position) == draws


def test_unseeded_draws_follow_the_engine_seed():
    def draws(engine_seed: int) -> list[int]:
        sampler = Sampler(torch.Generator().manual_seed(engine_seed))
        return sampler.sample(FLAT.expand(4, -1).contiguous(), [request(temperature=1.0) for _ in range(4)]
                              ).token_ids.tolist()

    assert draws(0) == draws(0)
    assert draws(0) != draws(1)
