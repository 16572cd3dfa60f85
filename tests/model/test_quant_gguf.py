"""GGUF tensors kept quantized: every supported type through tokenmill's kernels equals gguf's own
dequantization times the input."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from tests.model.quant_checkpoints import GGUF_MIX, gguf_cache_dir, random_blocks
from tokenmill import LLM, SamplingParams
from tokenmill.model.layers.linear import Linear
from tokenmill.model.quantization.gguf import GGUF_BLOCKS, gguf_kernel


@pytest.mark.parametrize("num_rows", [1, 3, 8, 17, 100])  # 3 and up: the tile kernel in bfloat16
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("type_name", list(GGUF_BLOCKS))
def test_gguf_type_through_kernels_equals_gguf_dequantize(type_name, dtype, num_rows):
    rows, cols = 96, 512
    raw = random_blocks(type_name, rows, cols)
    reference = torch.from_numpy(dequantize(raw, GGMLQuantizationType[type_name]).reshape(rows, cols).copy())
    kernel = gguf_kernel(torch.from_numpy(raw), type_name, rows, cols)
    x = torch.randn(num_rows, cols, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected = x.double() @ reference.double().T
    got = kernel.matmul(x).double()
    exact = type_name != "Q4_K"  # Q4_K's d * sc products are rounded to float16
    # Relative to sum |x| |w| (the size of the terms summed). float32: summation order only. bfloat16: the
    # activations' and output's rounding (2^-8); Q4_K adds its float16 scales' and offsets' rounding.
    tol = (1e-5 if dtype == torch.float32 else 8e-3) + (0 if exact else 2e-3)
    magnitude = (x.double().abs() @ reference.double().abs().T).max()
    assert (got - expected).abs().max() <= tol * magnitude, type_name
    # The dequantized weight itself (prefill path) and embedding rows: exact but for Q4_K's float16 products.
    weight = kernel.dequantize(torch.float32)
    atol = 0 if exact else 2e-3 * float(reference.abs().max())
    assert torch.allclose(weight, reference, rtol=0, atol=atol), (weight - reference).abs().max()
    ids = torch.tensor([0, 5, 95, 33])
    rows = kernel.rows(ids, torch.float32)
    assert torch.allclose(rows, reference[ids], rtol=0, atol=atol)


@pytest.mark.slow  # transformers' reference
def test_mixed_gguf_cache_matches_dequantized_transformers(tmp_path, tiny_tokenizer_dir):
    """A converted cache with every type, mixed inside fused layers (q/k Q4_K with v Q6_K, as Q4_K_M files
    store them): float32 greedy tokens equal transformers holding gguf's dequantized weights."""
    import json

    import transformers
    from safetensors.torch import load_file

    model_dir = gguf_cache_dir(tmp_path / "mix", tiny_tokenizer_dir)
    config = json.loads((model_dir / "config.json").read_text())
    types = config.pop("quantization_config")["tensor_types"]
    assert set(types.values()) == set(GGUF_BLOCKS) == set(GGUF_MIX.values())
    state = {}
    for name, t in load_file(model_dir / "model.safetensors").items():
        if name in types:
            rows = t.shape[0]
            t = torch.from_numpy(dequantize(t.numpy(), GGMLQuantizationType[types[name]]).reshape(rows, -1).copy())
        state[name] = t.float()
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    reference.load_state_dict(state, strict=False)
    reference.tie_weights()
    prompts = [[5, 9, 30, 31, 7], list(range(3, 60))]
    with torch.no_grad():
        expected = [reference.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False)[0, len(p):].tolist()
                    for p in prompts]
    llm = LLM(str(model_dir), dtype="float32", show_progress=False)
    qkv = llm.llm_engine.core.model.layers[0].self_attn.qkv_proj
    assert len(qkv.qweights) == 2  # Q4_K q/k in one int4 matmul, Q6_K v in an int8 one
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=8),
                        use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == expected


@pytest.mark.slow  # the bundled 135M model
def test_bundled_model_kept_quantized_answers_paris_in_110_mb(tmp_path, monkeypatch):
    """No flag: the bundled Q4_1 GGUF runs with its blocks packed (bf16 activations, the default on this CPU),
    says Paris, and its weights take at most 110 MB of the engine's allocations (bf16 took ~270 MB)."""
    monkeypatch.setenv("TOKENMILL_CACHE_DIR", str(tmp_path))
    llm = LLM(show_progress=False)
    model = llm.llm_engine.core.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert {type(m.quant_method).__name__ for m in linears} == {"GGUFLinearMethod"}
    assert all(m.weight is None for m in linears)  # the raw blocks are gone; no dequantized copy either
    assert model.weight_bytes() <= 110e6, f"{model.weight_bytes() / 1e6:.1f} MB"
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text, out[0].outputs[0].text


def test_bad_gguf_cache_errors_name_the_tensor(tmp_path, tiny_tokenizer_dir):
    import json

    from safetensors.torch import load_file, save_file

    model_dir = gguf_cache_dir(tmp_path / "bad", tiny_tokenizer_dir)
    tensors = load_file(model_dir / "model.safetensors")
    name = "model.layers.1.self_attn.q_proj.weight"
    good = tensors[name]
    tensors[name] = good[:, :-2].contiguous()  # truncated rows
    save_file(tensors, str(model_dir / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"'{name}' is torch.uint8 \(256, 142\), expected the raw Q4_K blocks"):
        LLM(str(model_dir), show_progress=False)
    del tensors[name]
    save_file(tensors, str(model_dir / "model.safetensors"))
    with pytest.raises(ValueError, match="1 weight tensors are missing from the checkpoint "
                                         r"\(layers.1.self_attn.q_proj.weight\)"):
        LLM(str(model_dir), show_progress=False)
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"]["tensor_types"][name] = "Q5_K"
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"GGUF tensor types \['Q5_K'\] cannot be kept quantized"):
        LLM(str(model_dir), show_progress=False)
    with pytest.raises(ValueError, match="contradicts the checkpoint, which is gguf-quantized"):
        LLM(str(model_dir), quantization="int8", show_progress=False)
