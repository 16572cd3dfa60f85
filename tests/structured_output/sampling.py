"""Sampling driven only by a grammar mask: random logits, temperature 1.0, the mask applied as the sampler
will apply it. With no model behind it, anything the mask lets through can come out."""

from __future__ import annotations

import torch

from tokenmill.structured_output import GrammarMatcher, TokenBitmaskBuffer


def sample_masked(
    matcher: GrammarMatcher, vocab_size: int, seed: int, max_tokens: int
) -> tuple[list[int], bool]:
    """Sample until the matcher terminates or max_tokens; returns (token ids without the stop token,
    terminated). Checks on every step that a stop token is allowed exactly when the grammar is complete."""
    # One torch thread: these are small ops, and on a shared machine extra threads only wait for each other.
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _sample(matcher, vocab_size, seed, max_tokens)
    finally:
        torch.set_num_threads(num_threads)


def _sample(matcher: GrammarMatcher, vocab_size: int, seed: int, max_tokens: int) -> tuple[list[int], bool]:
    generator = torch.Generator().manual_seed(seed)
    buffer = TokenBitmaskBuffer(2, vocab_size)
    token_ids: list[int] = []

    def allowed(token_id: int) -> bool:
        return bool((int(buffer.bitmask[0, token_id // 32]) >> (token_id % 32)) & 1)

    for _ in range(max_tokens):
        logits = torch.zeros(2, vocab_size)  # row 1: an unconstrained neighbour, which must stay untouched
        logits[0] = torch.randn(vocab_size, generator=generator)
        rows = buffer.fill([matcher, None])
        assert rows == [0]
        assert bool(buffer.bitmask[0].any()), f"no token allowed after {token_ids}"
        stop_allowed = any(allowed(i) for i in matcher.stop_token_ids)
        assert stop_allowed == matcher.is_completed(), (
            f"stop token allowed={stop_allowed} but grammar complete={matcher.is_completed()} after {token_ids}"
        )
        buffer.apply(logits, rows)
        assert not bool(logits[1].any()), "a row without a matcher was changed"
        # Sampling from softmax(logits) (temperature 1.0) by the exponential race: argmax of p_i / E_i.
        probs = torch.softmax(logits[0], dim=-1)
        token_id = int((probs / torch.empty_like(probs).exponential_(generator=generator)).argmax())
        assert allowed(token_id)
        assert matcher.accept_token(token_id), f"masked-in token {token_id} refused after {token_ids}"
        if token_id in matcher.stop_token_ids:
            assert matcher.is_terminated()
            return token_ids, True
        token_ids.append(token_id)
    return token_ids, False
