"""Quantization methods chosen at construction: int8 / int4 quantize-at-load, the registry, --quantization errors.

The reference is transformers holding weights quantized and dequantized by the test's own round-to-nearest code,
in float32: the engine's greedy tokens must equal it.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.kernels.cpu.quant import Int4Weight, Int8Weight
from tokenmill.model.layers.linear import Linear
from tokenmill.model.quantization import quantization_methods, resolve_quantization

DECODER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def reference_int8(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    return torch.round(w / scale).clamp(-127, 127) * scale


def reference_int4(w: torch.Tensor) -> torch.Tensor:
    n, k = w.shape
    group = 128 if k % 128 == 0 else 64 if k % 64 == 0 else 32
    g = w.reshape(n, k // group, group)
    lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / 15
    zero = torch.round(-lo / scale)
    q = (torch.round(g / scale) + zero).clamp(0, 15)
    return ((q - zero) * scale).reshape(n, k)


def greedy(llm: LLM, prompts: list[list[int]], max_tokens: int = 12) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.slow  # transformers' reference generation
@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantized_at_load_matches_dequantized_transformers(arch, method, tiny_models):
    import transformers

    path = tiny_models[arch]
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    dequantize = reference_int8 if method == "int8" else reference_int4
    with torch.no_grad():
        for name, module in reference.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in DECODER_PROJECTIONS:
                module.weight.copy_(dequantize(module.weight.float()))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, reference.config.vocab_size, (n,), generator=g).tolist() for n in (5, 17, 40)]
    expected = []
    with torch.no_grad():
        for p in prompts:
            ids = reference.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)
            expected.append(ids[0, len(p):].tolist())

    llm = LLM(str(path), dtype="float32", quantization=method, show_progress=False)
    assert greedy(llm, prompts) == expected
    model = llm.llm_engine.core.model
    kernel = Int8Weight if method == "int8" else Int4Weight
    linears = [m for m in model.modules() if isinstance(m, Linear) and (".mlp." in m.prefix or ".self_attn." in m.prefix)]
    assert linears and all(isinstance(m.qweight, kernel) for m in linears)
    # Quantized storage is smaller than the float32 model's.
    full = LLM(str(path), dtype="float32", show_progress=False).llm_engine.core.model
    assert model.weight_bytes() < full.weight_bytes()


def test_bfloat16_int4_and_int8_run_close_to_full_precision(llama_dir):
    prompts = [[5, 6, 7, 8, 9, 10]]
    for method in ("int8", "int4"):
        llm = LLM(str(llama_dir), dtype="bfloat16", quantization=method, show_progress=False)
        out = greedy(llm, prompts + [[11, 12]] * 3)  # batch of 4: the packed decode kernel
        assert all(len(o) == 12 for o in out)


def test_registry_and_flag_errors(llama_dir, tmp_path):
    assert {"unquantized", "int8", "int4"} <= set(quantization_methods())
    with pytest.raises(ValueError, match="quantization='nope' is not supported: use one of"):
        LLM(str(llama_dir), quantization="nope", show_progress=False)
    config = json.loads((llama_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="needs a gptq-quantized checkpoint") if "gptq" in quantization_methods() \
            else pytest.raises(ValueError, match="not supported"):
        resolve_quantization(config, "gptq")
    # A checkpoint that says it is quantized some other way contradicts the flag.
    quantized = tmp_path / "model"
    shutil.copytree(llama_dir, quantized)
    config["quantization_config"] = {"quant_method": "int8"}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="contradicts the checkpoint, which is int8-quantized"):
        LLM(str(quantized), quantization="int4", show_progress=False)
    config["quantization_config"] = {"quant_method": "magic"}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quant_method='magic' is not supported"):
        LLM(str(quantized), show_progress=False)
