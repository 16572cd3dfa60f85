"""The planner's weight bytes for AWQ, GPTQ, compressed-tensors and FP8 checkpoints equal the bytes the engine's
layers hold for them: on the GPU layout (the checkpoint's tensors kept as loaded for the Triton GEMM and
torch._scaled_mm; built here on the CPU with those kernels chosen) for every format, and on the CPU for the
int8 per-channel layout, whose CPU kernel keeps the same bytes."""

from __future__ import annotations

import pytest
import torch

from tests import quant_checkpoints as qc
from tokenmill.attention.torch_backend import TorchAttentionBackend
from tokenmill.model.layers.linear import Linear, resident_tensors, tensor_bytes
from tokenmill.model.llama import LlamaForCausalLM, RotaryEmbedding
from tokenmill.model.loader import iter_safetensors, read_hf_config, safetensors_files
from tokenmill.model.quantization import resolve_quantization
from tokenmill.model.quantization.fp8 import Fp8LinearMethod
from tokenmill.model.quantization.weight_only import WeightOnlyIntMethod
from tokenmill.model.registry import DecoderSpec
from tokenmill.planner import ModelArch
from tokenmill.planner.memory import weight_bytes

WRITERS = {
    "awq": lambda src, dst: qc.write_awq(src, dst, group_size=32),
    "gptq-act-order": lambda src, dst: qc.write_gptq(src, dst, group_size=32, sym=False, desc_act=True),
    "ct-w4a16-asym": lambda src, dst: qc.write_compressed_tensors(src, dst, bits=4, group_size=64, sym=False),
    "int8": lambda src, dst: qc.write_compressed_tensors(src, dst, bits=8, group_size=None),
    "fp8": lambda src, dst: qc.write_fp8(src, dst),
}


def load(model_dir, gpu_layout: bool) -> LlamaForCausalLM:
    """load_model's steps, with the GPU kernels chosen for every quantized layer when gpu_layout."""
    config = read_hf_config(model_dir)
    spec = DecoderSpec.from_hf_config(config)
    quant_config = resolve_quantization(config, None)
    backend = TorchAttentionBackend(spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.head_dim**-0.5, None)
    with torch.device("meta"):
        model = LlamaForCausalLM(spec, backend, 64, quant_config, torch.bfloat16)
    model = model.to_empty(device="cpu")
    model.rotary = RotaryEmbedding(spec, 64)
    with torch.no_grad():
        model.load_weights(iter_safetensors(safetensors_files(model_dir), False))
        for layer in model.modules():
            if gpu_layout and isinstance(layer, Linear):
                if isinstance(layer.quant_method, Fp8LinearMethod):
                    layer.quant_method.fp8_backend = "scaled_mm"
                elif isinstance(layer.quant_method, WeightOnlyIntMethod):
                    layer.quant_method.backend = "triton"
        model.process_weights_after_loading()
    return model


def decoder_linear_bytes(model: LlamaForCausalLM) -> int:
    seen: dict[int, int] = {}
    for layer in model.modules():
        if isinstance(layer, Linear) and (".self_attn." in layer.prefix or ".mlp." in layer.prefix):
            for t in resident_tensors(layer):
                key, nbytes = tensor_bytes(t)
                seen[key] = nbytes
    return sum(seen.values())


# The CPU repacks int4 for its kernel and dequantizes fp8 (docs/quantization.md): only int8 keeps the planned
# bytes there.
CASES = [(fmt, True) for fmt in WRITERS] + [("int8", False)]


@pytest.mark.parametrize("fmt,gpu_layout", CASES, ids=[f"{f}-{'gpu-layout' if g else 'cpu'}" for f, g in CASES])
def test_planner_weight_bytes_equal_engine(fmt, gpu_layout, llama_dir, tmp_path):
    WRITERS[fmt](llama_dir, tmp_path / fmt)
    model = load(tmp_path / fmt, gpu_layout)
    arch = ModelArch.from_hf_config(read_hf_config(tmp_path / fmt))
    planned = weight_bytes(arch)
    assert arch.quantization is not None
    assert decoder_linear_bytes(model) == planned.by_component["attention"] + planned.by_component["mlp"]
