"""GrammarMatcher state: refusing tokens, termination, rollback and reset restore the exact mask state."""

from __future__ import annotations

import pytest
import torch

from tests.structured_output.sampling import sample_masked
from tests.structured_output.test_backend_sampling import PERSON
from tokenmill.structured_output import StructuredOutputsParams, allocate_token_bitmask

BACKENDS = ("xgrammar", "guidance")


def mask_of(matcher, vocab_size):
    bitmask = allocate_token_bitmask(1, vocab_size)
    matcher.fill_bitmask(bitmask, 0)
    return bitmask[0].clone()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rollback_and_reset_restore_masks(tiny_manager, tiny_tokenizer, backend):
    vocab = tiny_tokenizer.vocab_size
    compiled = tiny_manager.compile(StructuredOutputsParams(json=PERSON, backend=backend))
    token_ids, terminated = sample_masked(compiled.matcher(), vocab, seed=3, max_tokens=400)
    assert terminated
    eos = tiny_tokenizer.eos_token_id
    token_ids = [*token_ids, eos]

    matcher = compiled.matcher()
    masks = [mask_of(matcher, vocab)]  # masks[i]: after accepting i tokens
    for token_id in token_ids:
        assert matcher.accept_token(token_id)
        masks.append(mask_of(matcher, vocab))
    assert matcher.is_terminated() and matcher.num_accepted_tokens == len(token_ids)
    assert not matcher.accept_token(token_ids[0]), "a terminated matcher accepts nothing"

    matcher.rollback(1)  # the stop token
    assert not matcher.is_terminated() and matcher.is_completed()
    assert torch.equal(mask_of(matcher, vocab), masks[-2])
    matcher.rollback(5)
    assert torch.equal(mask_of(matcher, vocab), masks[-7])
    assert not matcher.is_completed()
    # Going forward again gives the same masks.
    for index in range(len(token_ids) - 6, len(token_ids)):
        assert matcher.accept_token(token_ids[index])
        assert torch.equal(mask_of(matcher, vocab), masks[index + 1])
    assert matcher.is_terminated()

    # Preemption-recompute: reset, then accept the output again.
    matcher.reset()
    assert matcher.num_accepted_tokens == 0 and not matcher.is_terminated()
    assert torch.equal(mask_of(matcher, vocab), masks[0])
    for index, token_id in enumerate(token_ids):
        assert matcher.accept_token(token_id)
        assert torch.equal(mask_of(matcher, vocab), masks[index + 1])

    with pytest.raises(ValueError, match="cannot roll back"):
        matcher.rollback(len(token_ids) + 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_refused_token_leaves_state_unchanged(tiny_manager, tiny_tokenizer, backend):
    vocab = tiny_tokenizer.vocab_size
    compiled = tiny_manager.compile(StructuredOutputsParams(regex="ab[0-9]", backend=backend))
    matcher = compiled.matcher()
    a, b = (tiny_tokenizer.token_to_id(c) for c in "ab")
    assert matcher.accept_token(a)
    before = mask_of(matcher, vocab)
    eos = tiny_tokenizer.eos_token_id
    for refused in (a, eos, tiny_tokenizer.token_to_id("z"), vocab + 5, -1):
        assert not matcher.accept_token(refused)
        assert torch.equal(mask_of(matcher, vocab), before)
    assert matcher.num_accepted_tokens == 1
    assert matcher.accept_token(b) and matcher.accept_token(tiny_tokenizer.token_to_id("7"))
    assert matcher.is_completed() and not matcher.is_terminated()
    allowed = mask_of(matcher, vocab)
    # Complete and nothing can follow: only the stop tokens are allowed.
    allowed_ids = [i for i in range(vocab) if (int(allowed[i // 32]) >> (i % 32)) & 1]
    assert allowed_ids == sorted(matcher.stop_token_ids)
    assert matcher.accept_token(eos) and matcher.is_terminated()
    # A terminated matcher still leaves a valid (stop-only) row.
    allowed = mask_of(matcher, vocab)
    assert [i for i in range(vocab) if (int(allowed[i // 32]) >> (i % 32)) & 1] == sorted(matcher.stop_token_ids)


def test_special_tokens_never_allowed_as_text(tiny_manager, tiny_tokenizer):
    """A permissive regex must not let special tokens through: decoding would drop them from the text."""
    special = [i for i in tiny_tokenizer.all_special_ids if i not in tiny_tokenizer.eos_token_ids]
    assert special
    for backend in BACKENDS:
        matcher = tiny_manager.compile(StructuredOutputsParams(regex="(.|\n){0,20}", backend=backend)).matcher()
        mask = mask_of(matcher, tiny_tokenizer.vocab_size)
        assert all(not (int(mask[i // 32]) >> (i % 32)) & 1 for i in special), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_model_vocabulary(tiny_tokenizer, backend):
    """The model's vocabulary wider than the tokenizer's (a padded lm_head): padding ids never allowed."""
    from tokenmill.structured_output import StructuredOutputManager

    vocab = tiny_tokenizer.vocab_size + 50
    manager = StructuredOutputManager(tiny_tokenizer, vocab_size=vocab, backend=backend)
    try:
        matcher = manager.compile(StructuredOutputsParams(regex="[a-z]{1,5}")).matcher()
        mask = mask_of(matcher, vocab)
        assert mask.shape[0] == (vocab + 31) // 32
        assert all(not (int(mask[i // 32]) >> (i % 32)) & 1 for i in range(tiny_tokenizer.vocab_size, vocab))
        assert not matcher.accept_token(vocab - 1)
    finally:
        manager.shutdown()
