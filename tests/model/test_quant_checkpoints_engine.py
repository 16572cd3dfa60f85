"""Acceptance: tiny AWQ, GPTQ (with and without act-order), compressed-tensors int8 / int4 and FP8 checkpoints,
written by the test quantizer (tests/quant_checkpoints.py), run by the engine like a transformers model holding
the weights the checkpoint encodes (the quantizer's own reference dequantization):
- logits agree (prompt log-probabilities at every position, tolerance per dtype);
- greedy tokens are identical in float32 compute, plain, with chunked prefill and under preemption;
- the bad-checkpoint errors reach the user through LLM().
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests import quant_checkpoints as qc
from tests.engine.test_greedy_vs_transformers import engine_kwargs
from tokenmill import LLM, SamplingParams

pytestmark = pytest.mark.slow  # transformers references and an engine per format and setting

MAX_TOKENS = 12
WRITERS = {
    "awq": lambda src, dst: qc.write_awq(src, dst, group_size=32),
    "gptq": lambda src, dst: qc.write_gptq(src, dst, group_size=32),
    "gptq-act-order": lambda src, dst: qc.write_gptq(src, dst, group_size=32, sym=False, desc_act=True),
    "int8": lambda src, dst: qc.write_compressed_tensors(src, dst, bits=8, group_size=None),
    "ct-w4a16": lambda src, dst: qc.write_compressed_tensors(src, dst, bits=4, group_size=64, sym=False),
    "fp8": lambda src, dst: qc.write_fp8(src, dst),
}
GREEDY_FORMATS = ("awq", "gptq", "gptq-act-order", "int8")


def make_prompts(vocab_size: int, num: int = 8, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 90, (num,), generator=g).tolist()
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def quantized(tiny_models, tmp_path_factory) -> dict[str, tuple]:
    """format -> (checkpoint dir, transformers reference, prompts, reference greedy continuations). The llama
    (untied lm_head) for most formats, the qwen2 (q/k/v biases, tied embeddings) for act-order."""
    root = tmp_path_factory.mktemp("quantized_engine")
    out = {}
    for fmt, write in WRITERS.items():
        src = tiny_models["qwen2" if fmt == "gptq-act-order" else "llama"]
        weights = write(src, root / fmt)
        reference = qc.dequantized_reference(src, weights)
        prompts = make_prompts(reference.config.vocab_size)
        continuations = []
        if fmt in GREEDY_FORMATS:
            with torch.no_grad():
                for p in prompts:
                    ids = reference.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False)
                    continuations.append(ids[0, len(p):].tolist())
        out[fmt] = (root / fmt, reference, prompts, continuations)
    return out


@pytest.mark.parametrize("setting", ["plain", "chunked", "preempt"])
@pytest.mark.parametrize("fmt", GREEDY_FORMATS)
def test_greedy_matches_dequantized_transformers(fmt, setting, quantized):
    path, _, prompts, expected = quantized[fmt]
    llm = LLM(str(path), dtype="float32", show_progress=False, **engine_kwargs(setting, path))
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    for i, (o, e) in enumerate(zip(outs, expected, strict=True)):
        assert list(o.outputs[0].token_ids) == e, f"{fmt}/{setting}: prompt {i} differs from transformers"
    core = llm.llm_engine.core
    if setting == "preempt":
        assert core.scheduler.num_preemptions > 0, "the KV budget was meant to force preemption"
    if setting == "chunked":
        assert max(len(p) for p in prompts) > core.max_num_batched_tokens
    core.scheduler.check_integrity()


# dtype -> max |log-prob difference| allowed against the float32 reference
LOGPROB_TOL = {"float32": 2e-4, "bfloat16": 0.15}


LOGIT_CASES = [(fmt, "float32") for fmt in WRITERS] + [(fmt, "bfloat16") for fmt in ("awq", "gptq-act-order", "fp8")]


@pytest.mark.parametrize("fmt,dtype", LOGIT_CASES)
def test_logits_match_dequantized_transformers(fmt, dtype, quantized):
    path, reference, prompts, _ = quantized[fmt]
    prompts = prompts[:4]
    llm = LLM(str(path), dtype=dtype, show_progress=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3), use_tqdm=False)
    worst = 0.0
    for p, o in zip(prompts, outs, strict=True):
        with torch.no_grad():
            ref = torch.log_softmax(reference(torch.tensor([p])).logits[0].float(), dim=-1)  # [len, vocab]
        assert o.prompt_logprobs is not None and len(o.prompt_logprobs) == len(p)
        for pos in range(1, len(p)):
            entries = o.prompt_logprobs[pos]
            assert p[pos] in entries
            for token, lp in entries.items():
                worst = max(worst, abs(lp.logprob - ref[pos - 1, token].item()))
    assert worst < LOGPROB_TOL[dtype], f"{fmt} in {dtype}: log-probs differ by up to {worst:.2e}"


def test_bad_checkpoints_through_llm(quantized, tmp_path):
    path = quantized["gptq"][0]
    with pytest.raises(ValueError, match="contradicts the checkpoint, which is gptq-quantized"):
        LLM(str(path), quantization="awq", show_progress=False)

    def broken(edit_tensors=None, edit_config=None):
        dst = tmp_path / f"broken{len(list(tmp_path.iterdir()))}"
        shutil.copytree(path, dst)
        if edit_tensors:
            tensors = load_file(str(dst / "model.safetensors"))
            edit_tensors(tensors)
            save_file(tensors, str(dst / "model.safetensors"))
        if edit_config:
            config = json.loads((dst / "config.json").read_text())
            edit_config(config["quantization_config"])
            (dst / "config.json").write_text(json.dumps(config))
        return str(dst)

    with pytest.raises(ValueError, match=r"missing from the checkpoint \(layers\.1\.mlp\.up_proj\.qzeros\)"):
        LLM(broken(lambda t: t.pop("model.layers.1.mlp.up_proj.qzeros")), show_progress=False)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.v_proj\.scales' has shape \(2, 31\)"):
        LLM(broken(lambda t: t.update({"model.layers.0.self_attn.v_proj.scales":
                                       t["model.layers.0.self_attn.v_proj.scales"][:, :31].contiguous()})),
            show_progress=False)
    with pytest.raises(ValueError, match="bits=3 is not supported"):
        LLM(broken(edit_config=lambda c: c.update(bits=3)), show_progress=False)
    with pytest.raises(ValueError, match="group_size=48 is not supported"):
        LLM(broken(edit_config=lambda c: c.update(group_size=48)), show_progress=False)
