"""AWQ, GPTQ, compressed-tensors and FP8 layers load the published layouts and multiply by exactly the weight
the checkpoint encodes (the test quantizer's reference dequantization), on the CPU kernels and on the Triton
GEMM (under TRITON_INTERPRET=1); bad checkpoints give errors naming the tensor and the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import quant_checkpoints as qc
from tokenmill.kernels.cpu.quant import Int4Weight, Int8Weight
from tokenmill.model.layers.linear import Linear
from tokenmill.model.quantization import resolve_quantization

QKV = ("q_proj", "k_proj", "v_proj")
LAYER = "model.layers.0.self_attn"

# name -> writer of a checkpoint from the tiny llama
FORMATS = {
    "awq": lambda src, dst: qc.write_awq(src, dst, group_size=32),
    "gptq": lambda src, dst: qc.write_gptq(src, dst, group_size=32),
    "gptq-act-order-asym": lambda src, dst: qc.write_gptq(src, dst, group_size=32, sym=False, desc_act=True),
    "gptq-8bit-act-order": lambda src, dst: qc.write_gptq(src, dst, group_size=64, bits=8, desc_act=True),
    "ct-w4a16": lambda src, dst: qc.write_compressed_tensors(src, dst, bits=4, group_size=32),
    "ct-w4a16-asym-channel": lambda src, dst: qc.write_compressed_tensors(src, dst, bits=4, group_size=None,
                                                                          sym=False),
    "ct-w8a16": lambda src, dst: qc.write_compressed_tensors(src, dst, bits=8, group_size=None),
    "ct-int8-unpacked": lambda src, dst: qc.write_compressed_tensors(src, dst, bits=8, group_size=None,
                                                                     fmt="int-quantized"),
    "fp8": lambda src, dst: qc.write_fp8(src, dst),
    "fp8-channel": lambda src, dst: qc.write_fp8(src, dst, per_channel=True),
}


@pytest.fixture(scope="module")
def checkpoints(llama_dir, tmp_path_factory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    root = tmp_path_factory.mktemp("quant_checkpoints")
    return {name: (root / name, write(llama_dir, root / name)) for name, write in FORMATS.items()}


def build_qkv(model_dir: Path, dtype: torch.dtype, backend: str | None = None,
              tensors: dict[str, torch.Tensor] | None = None) -> Linear:
    """Layer 0's fused q/k/v projection of the checkpoint in model_dir, loaded and processed."""
    config = json.loads((model_dir / "config.json").read_text())
    qconfig = resolve_quantization(config, None)
    shards = [f"{LAYER}.{p}" for p in QKV]
    method = qconfig.get_linear_method(f"{LAYER}.qkv_proj", shards)
    if backend is not None:
        method.backend = backend
    sizes = [64, 32, 32]
    layer = Linear(64, sum(sizes), quant_method=method, output_sizes=sizes, dtype=dtype, prefix=f"{LAYER}.qkv_proj")
    tensors = tensors if tensors is not None else load_file(str(model_dir / "model.safetensors"))
    for name, tensor in tensors.items():
        for shard_id, part in enumerate(shards):
            if name.startswith(part + "."):
                try:
                    layer.load_weight(name.removeprefix(part + "."), tensor, shard_id)
                except ValueError as e:  # named as the model's loader names them
                    raise ValueError(f"checkpoint tensor {name!r} {e}") from None
    layer.process_weights_after_loading()
    return layer


def reference_qkv(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([weights[f"{LAYER}.{p}.weight"] for p in QKV])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_cpu_layer_multiplies_by_the_encoded_weight(fmt, dtype, checkpoints):
    model_dir, weights = checkpoints[fmt]
    layer = build_qkv(model_dir, dtype)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    ref = x @ reference_qkv(weights).T
    out = layer(x.to(dtype)).float()
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * ref.abs().max().item())
    if not fmt.startswith("fp8"):
        assert not any(p.dtype == torch.int32 for p in layer.parameters()), "the checkpoint layout is freed"
        # int4 runs on the int4 kernel, except in float32 with zero points, whose float16 offsets would round
        # the weight: then q - zero is held in int8 (exact).
        int4 = not fmt.startswith("gptq-8bit") and fmt not in ("ct-w8a16", "ct-int8-unpacked")
        exact_in_int4 = fmt in ("gptq", "ct-w4a16")  # symmetric: offset -8 * scale is exact in float16
        expected = Int4Weight if int4 and (dtype == torch.bfloat16 or exact_in_int4) else Int8Weight
        assert isinstance(layer.qweight, expected)


@pytest.mark.parametrize("fmt", ["awq", "gptq-act-order-asym", "ct-w4a16-asym-channel", "ct-w8a16",
                                 "ct-int8-unpacked"])
def test_triton_layer_reads_the_checkpoint_layout(fmt, checkpoints):
    pytest.importorskip("triton")
    model_dir, weights = checkpoints[fmt]
    layer = build_qkv(model_dir, torch.float32, backend="triton")
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    ref = x @ reference_qkv(weights).T
    torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def _tensors(checkpoints, fmt):
    return load_file(str(checkpoints[fmt][0] / "model.safetensors"))


def test_missing_tensor_is_named(checkpoints):
    tensors = _tensors(checkpoints, "awq")
    del tensors[f"{LAYER}.k_proj.qzeros"]
    with pytest.raises(ValueError, match=rf"'{LAYER}\.k_proj\.qzeros' is missing"):
        build_qkv(checkpoints["awq"][0], torch.float32, tensors=tensors)


@pytest.mark.parametrize("fmt,tensor,bad,message", [
    ("awq", "v_proj.qweight", lambda t: t[:, :-1], r"has shape \(64, 3\), expected \(64, 4\)"),
    ("gptq", "q_proj.scales", lambda t: t.to(torch.int32), "dtype"),
    ("gptq", "q_proj.scales", lambda t: t * float("nan"), "non-finite scales"),
    ("gptq-act-order-asym", "k_proj.g_idx", lambda t: t + 7, "group indices outside"),
    ("gptq-act-order-asym", "v_proj.g_idx", lambda t: t.flip(0), "differs from the g_idx"),
    ("ct-w4a16", "q_proj.weight_shape", lambda t: t + 1, r"holds \[65, 65\], expected \[64, 64\]"),
    ("fp8", "k_proj.weight", lambda t: t.to(torch.bfloat16), "dtype torch.bfloat16, expected torch.float8_e4m3fn"),
    ("fp8", "k_proj.weight_scale", lambda t: -t, "not positive and finite"),
    ("fp8", "k_proj.weight_scale", lambda t: t.expand(4, 4).contiguous(), "block-wise"),
])
def test_corrupt_tensor_is_named(checkpoints, fmt, tensor, bad, message):
    tensors = _tensors(checkpoints, fmt)
    tensors[f"{LAYER}.{tensor}"] = bad(tensors[f"{LAYER}.{tensor}"])
    with pytest.raises(ValueError, match=message) as info:
        build_qkv(checkpoints[fmt][0], torch.float32, tensors=tensors)
    assert f"{LAYER}.{tensor.split('.')[0]}" in str(info.value)


@pytest.mark.parametrize("qcfg,message", [
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "bits=3 is not supported"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 48}, "group_size=48 is not supported"),
    ({"quant_method": "awq", "bits": 4, "group_size": 256, "zero_point": True, "version": "gemm"},
     "group_size=256 is not supported"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemv"},
     "version='gemv' is not supported"),
    ({"quant_method": "awq", "bits": 8, "group_size": 128}, "bits=8 is not supported"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "block-wise"),
    ({"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "int", "dynamic": True}}}}, "activation quantization"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 2, "type": "int", "strategy": "group", "group_size": 128}}}},
     "2 bits are not supported"),
])
def test_unsupported_configs_are_rejected(qcfg, message):
    with pytest.raises(ValueError, match=message):
        resolve_quantization({"quantization_config": qcfg}, None)


def test_flag_contradicting_the_checkpoint_is_rejected(checkpoints):
    config = json.loads((checkpoints["awq"][0] / "config.json").read_text())
    with pytest.raises(ValueError, match="contradicts the checkpoint"):
        resolve_quantization(config, "gptq")
    assert type(resolve_quantization(config, "awq")).__name__ == "AWQConfig"


def test_act_order_permutes_activations_once_sorted(checkpoints):
    """Act-order layers sort their input channels by group at load and gather x's columns to match."""
    layer = build_qkv(checkpoints["gptq-act-order-asym"][0], torch.float32)
    assert layer.input_perm is not None and sorted(layer.input_perm.tolist()) == list(range(64))
    assert build_qkv(checkpoints["gptq"][0], torch.float32).input_perm is None


def test_fp8_dequantized_off_hopper_says_so(checkpoints, caplog):
    with caplog.at_level("INFO", logger="tokenmill.model.quantization.fp8"):
        layer = build_qkv(checkpoints["fp8"][0], torch.bfloat16)
    assert layer.quant_backend == "dequant"
    assert "fp8 weights are dequantized to bfloat16 at load" in caplog.text


def test_fp8_scaled_mm_wrapper(checkpoints):
    """The Hopper path's wrapper (per-token activation scales, row-wise weight scales), run by the CPU's
    torch._scaled_mm: within fp8 rounding of the dequantized product."""
    if not hasattr(torch, "_scaled_mm"):
        pytest.skip("torch._scaled_mm is not available")
    model_dir, weights = checkpoints["fp8"]
    config = json.loads((model_dir / "config.json").read_text())
    method = resolve_quantization(config, None).get_linear_method(f"{LAYER}.qkv_proj",
                                                                  [f"{LAYER}.{p}" for p in QKV])
    method.fp8_backend = "scaled_mm"
    layer = Linear(64, 128, quant_method=method, output_sizes=[64, 32, 32], dtype=torch.bfloat16)
    tensors = load_file(str(model_dir / "model.safetensors"))
    for shard_id, part in enumerate(QKV):
        for suffix in ("weight", "weight_scale"):
            layer.load_weight(suffix, tensors[f"{LAYER}.{part}.{suffix}"], shard_id)
    layer.process_weights_after_loading()
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (128,)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    ref = x @ reference_qkv(weights).T
    out = layer(x.to(torch.bfloat16)).float()
    # fp8 activations: a relative error of about 2^-4 per element, averaged over 64 products.
    torch.testing.assert_close(out, ref, rtol=0.1, atol=0.05 * ref.abs().max().item())
