"""Greedy outputs equal transformers' greedy generate (float32) for every supported architecture."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import TINY_ARCHS
from tokenmill import LLM, SamplingParams
from tokenmill.model.loader import read_hf_config
from tokenmill.planner import ModelArch, kv_cache_bytes_per_block

pytestmark = pytest.mark.slow  # transformers' references take ~25 s to generate

MAX_TOKENS = 24


def make_prompts(vocab_size: int, num: int = 16, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 110, (num,), generator=g).tolist()
    # Ids 0-2 are special tokens of the tiny tokenizer.
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def references(tiny_models) -> dict[str, tuple[list[list[int]], list[list[int]]]]:
    """model_type -> (prompts, transformers' greedy continuations)."""
    import transformers

    out = {}
    for arch, path in tiny_models.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        prompts = make_prompts(model.config.vocab_size)
        continuations = []
        with torch.no_grad():
            for p in prompts:
                ids = model.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False)
                continuations.append(ids[0, len(p):].tolist())
        out[arch] = (prompts, continuations)
    return out


def engine_kwargs(setting: str, model_dir) -> dict:
    if setting == "plain":
        return {}
    if setting == "chunked":
        # Smaller than most prompts: every long prompt is prefilled in several chunks, beside decodes.
        return {"max_num_batched_tokens": 24}
    if setting == "preempt":
        # 16 blocks of 16 tokens: one request always fits, all 16 together do not.
        arch = ModelArch.from_hf_config(read_hf_config(model_dir))
        return {"kv_cache_memory": 16 * kv_cache_bytes_per_block(arch, 16, "float32"), "max_model_len": 256}
    raise ValueError(setting)


def run_greedy(model_dir, prompts, **kwargs):
    llm = LLM(str(model_dir), dtype="float32", show_progress=False, **kwargs)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    return llm, [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("setting", ["plain", "chunked", "preempt"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_greedy_matches_transformers(arch, setting, async_scheduling, tiny_models, references):
    prompts, expected = references[arch]
    llm, got = run_greedy(tiny_models[arch], prompts, async_scheduling=async_scheduling,
                          **engine_kwargs(setting, tiny_models[arch]))
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g == e, f"{arch}/{setting}: prompt {i} ({len(prompts[i])} tokens) differs from transformers"
    core = llm.llm_engine.core
    if setting == "preempt":
        assert core.scheduler.num_preemptions > 0, "the KV budget was meant to force preemption"
    if setting == "chunked":
        assert max(len(p) for p in prompts) > core.max_num_batched_tokens
    # Everything is freed at the end.
    assert core.kv_cache_manager.usage == 0.0
    core.scheduler.check_integrity()


def test_output_independent_of_batch_mates(tiny_models, references):
    prompts, _ = references["llama"]
    _, batched = run_greedy(tiny_models["llama"], prompts)
    llm = LLM(str(tiny_models["llama"]), dtype="float32", show_progress=False)
    for i in (0, 5, 11):
        alone = llm.generate([{"prompt_token_ids": prompts[i]}],
                             SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
        assert alone[0].outputs[0].token_ids == batched[i]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_prefix_caching_on_off_identical_and_hits(arch, tiny_models, references):
    prompts, expected = references[arch]
    _, off = run_greedy(tiny_models[arch], prompts, enable_prefix_caching=False)
    llm, on = run_greedy(tiny_models[arch], prompts, enable_prefix_caching=True)
    assert off == expected and on == expected
    # A second round whose prompts share a 64-token prefix with each other and the first round's prompt 0.
    prefix = (prompts[0] * 3)[:64]
    second = [prefix + p[:10] for p in prompts[1:9]]
    kv = llm.llm_engine.core.kv_cache_manager
    hits_before = kv.num_hit_tokens
    outs = llm.generate([{"prompt_token_ids": p} for p in second],
                        SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    assert kv.num_hit_tokens - hits_before >= 7 * 64
    assert sum(o.num_cached_tokens for o in outs) >= 7 * 64
    # Cached results equal freshly computed ones.
    _, fresh = run_greedy(tiny_models[arch], second, enable_prefix_caching=False)
    assert [o.outputs[0].token_ids for o in outs] == fresh
