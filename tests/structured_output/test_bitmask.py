"""Token bitmasks: the native apply kernel against the torch reference, rows without a processor untouched."""

from __future__ import annotations

import pytest
import torch

from tokenmill.sample.logits_processor import LogitsProcessor
from tokenmill.structured_output import TokenBitmaskBuffer, allocate_token_bitmask, apply_token_bitmask_
from tokenmill.structured_output.bitmask import (
    apply_token_bitmask_torch_,
    bitmask_words,
    unpack_token_bitmask,
)


def random_bitmask(batch: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**31), 2**31 - 1, (batch, bitmask_words(vocab)), generator=g, dtype=torch.int64).to(
        torch.int32
    )


def test_allocate_and_unpack():
    bitmask = allocate_token_bitmask(3, 70)
    assert bitmask.shape == (3, 3) and bitmask.dtype == torch.int32
    assert unpack_token_bitmask(bitmask, 70).all()
    bitmask[1].zero_()
    bitmask[1, 2] = 1 << 5  # token 69
    bitmask[1, 0] = -(2**31)  # bit 31: token 31
    allowed = unpack_token_bitmask(bitmask, 70)
    assert allowed[1].nonzero().flatten().tolist() == [31, 69]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [49152, 385])
def test_apply_matches_reference_and_leaves_other_rows(dtype, vocab):
    logits = torch.randn(6, vocab).to(dtype)
    bitmask = random_bitmask(6, vocab, seed=vocab)
    rows = [0, 2, 5]
    fast, reference = logits.clone(), logits.clone()
    apply_token_bitmask_(fast, bitmask, rows)
    apply_token_bitmask_torch_(reference, bitmask, rows)
    assert torch.equal(fast, reference)
    allowed = unpack_token_bitmask(bitmask, vocab)
    for row in range(6):
        if row in rows:
            assert torch.equal(fast[row][allowed[row]], logits[row][allowed[row]])
            assert torch.isneginf(fast[row][~allowed[row]]).all()
        else:
            assert torch.equal(fast[row], logits[row])


def test_apply_masks_logits_past_the_bitmask():
    """A model vocabulary padded past the bitmask's width: the padding ids are never allowed."""
    logits = torch.zeros(2, 100)
    bitmask = allocate_token_bitmask(2, 64)
    apply_token_bitmask_(logits, bitmask, [1])
    assert torch.isneginf(logits[1, 64:]).all() and (logits[1, :64] == 0).all()
    assert (logits[0] == 0).all()


class _AllowOnly(LogitsProcessor):
    uses_bitmask = True

    def __init__(self, token_id: int):
        self.token_id = token_id

    def fill_bitmask(self, bitmask, row):
        bitmask[row].zero_()
        bitmask[row, self.token_id // 32] = 1 << (self.token_id % 32)

    def accept_token(self, token_id):
        return token_id == self.token_id

    def rollback(self, num_tokens):
        pass

    def reset(self):
        pass


def test_buffer_fills_and_applies_only_processor_rows():
    buffer = TokenBitmaskBuffer(2, 300)
    logits = torch.randn(4, 300)  # more rows than the buffer had: it grows
    before = logits.clone()
    rows = buffer.fill([None, _AllowOnly(7), None, _AllowOnly(299)])
    assert rows == [1, 3]
    buffer.apply(logits, rows)
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    assert logits[1].argmax() == 7 and torch.isfinite(logits[1]).sum() == 1
    assert logits[3].argmax() == 299 and torch.isfinite(logits[3]).sum() == 1


def test_processor_apply_default_uses_the_bitmask():
    logits = torch.randn(300)
    _AllowOnly(42).apply(logits)
    assert torch.isfinite(logits).nonzero().flatten().tolist() == [42]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernel_matches_reference(dtype):
    """The torch.compile'd kernel (used once warmed up) gives the reference result, for all rows and a subset."""
    from tokenmill.structured_output.bitmask import _COMPILED, warmup_apply_kernel

    vocab = 385
    if not warmup_apply_kernel(vocab, dtype):
        pytest.skip(f"torch.compile unavailable here: {_COMPILED.failed}")
    assert _COMPILED.ready(vocab, dtype)
    for batch, rows in ((1, [0]), (5, [0, 1, 2, 3, 4]), (7, [1, 4, 6])):
        logits = torch.randn(batch, vocab).to(dtype)
        bitmask = random_bitmask(batch, vocab, seed=batch)
        fast, reference = logits.clone(), logits.clone()
        apply_token_bitmask_(fast, bitmask, rows)
        apply_token_bitmask_torch_(reference, bitmask, rows)
        assert torch.equal(fast, reference)
        for row in set(range(batch)) - set(rows):
            assert torch.equal(fast[row], logits[row])


@pytest.mark.slow
def test_model_steps_while_the_kernel_compiles_in_the_background(tiny_models, monkeypatch):
    """The background compile traces with torch.fx, which patches torch.nn.Module.__call__ for every thread while
    it runs: engine steps on the main thread at that time failed ("module is not installed as a submodule") and
    took the engine down. Steps and the compile now exclude each other (TRACING_LOCK): greedy generation runs
    through compiles unchanged. (Compile caches off: a cached graph skips the trace. The trace is a short part of
    a compile, so without the lock this failed in some runs, not all.)"""
    import threading

    import torch._functorch.config
    import torch._inductor.config

    from tokenmill import LLM, SamplingParams
    from tokenmill.structured_output.bitmask import _COMPILED, warmup_apply_kernel

    monkeypatch.setattr(torch._inductor.config, "force_disable_caches", True)
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)

    llm = LLM(str(tiny_models["llama"]), dtype="float32", show_progress=False, max_model_len=256,
              kv_cache_memory="8MiB")
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    expected = llm.generate(["The quick brown fox"], params, use_tqdm=False)[0].outputs[0].token_ids
    compiles = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # new (vocabulary, dtype) pairs: fresh traces
        thread = threading.Thread(target=lambda d=dtype: compiles.append(warmup_apply_kernel(611, d)))
        thread.start()
        while thread.is_alive():
            out = llm.generate(["The quick brown fox"], params, use_tqdm=False)
            assert out[0].outputs[0].token_ids == expected
        thread.join()
    if not all(compiles):
        pytest.skip(f"torch.compile unavailable here: {_COMPILED.failed}")
