"""Test-side quantizers: write a tiny random model's linear layers in the published checkpoint layouts.

AWQ (GEMM), GPTQ (v1, with and without act-order, symmetric or not, 4 or 8 bit), compressed-tensors
pack-quantized (W4A16, W8A16, as llm-compressor writes them) and FP8 (vLLM's `quant_method: fp8`, and
compressed-tensors float-quantized per channel). Each writer returns the weights a checkpoint reader must
recover, computed here by a reference dequantization written independently of the engine's loaders (plain
loops over the packed words), so a transformers model holding them is the reference for the engine.

Layouts (K = in_features, N = out_features, g = group_size):
  AWQ GEMM   qweight int32 [K, N/8] (8 nibbles along N in the order 0,2,4,6,1,3,5,7), qzeros int32 [K/g, N/8]
             (same packing), scales fp16 [K/g, N]; w = (q - z) * s.
  GPTQ v1    qweight int32 [K*b/32, N] (packed along K, in order), qzeros int32 [K/g, N*b/32] (packed along N,
             stores z - 1), scales fp16 [K/g, N], g_idx int32 [K] (group of each input channel; act-order
             permutes them); w[n, k] = (q - z[g_idx[k]]) * s[g_idx[k]].
  compressed-tensors pack-quantized: weight_packed int32 [N, K*b/32] (packed along K, in order, values stored
             as q + 2^(b-1)), weight_scale [N, K/g] (or [N, 1] per channel), weight_zero_point int32
             [N*b/32, K/g] (asymmetric only, packed along N), weight_shape int [2]; w = (q - zp) * s.
  FP8        weight float8_e4m3fn [N, K] with weight_scale float32 per tensor ([] ) or per channel ([N, 1]);
             w = weight * scale.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# Hugging Face names of the linear layers a quantized Llama checkpoint stores quantized.
LINEAR_SUFFIXES = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column AWQ_ORDER[i] of its 8


def is_quantized_linear(name: str) -> bool:
    return name.endswith(".weight") and any(f".{s}." in name for s in LINEAR_SUFFIXES)


# ---- round-to-nearest quantization ------------------------------------------------------------------------

def quantize_groups(
    w: torch.Tensor, bits: int, g_idx: torch.Tensor, num_groups: int, sym: bool, min_zero: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest quantization of w [N, K] with input channel k in group g_idx[k].

    Returns q int32 [N, K] in 0..2^bits-1, scales fp16 [N, G] and zeros int32 [N, G], with
    w ~ (q - zeros[:, g_idx]) * scales[:, g_idx]. Scales are rounded to fp16 before q is computed, so the
    dequantized weight is exactly what the checkpoint encodes. min_zero=1 keeps asymmetric zero points >= 1,
    as GPTQ v1 needs (it stores z - 1 in an unsigned field)."""
    maxq = 2**bits - 1
    n = w.shape[0]
    scales = torch.empty(n, num_groups, dtype=torch.float16)
    zeros = torch.empty(n, num_groups, dtype=torch.int32)
    q = torch.empty(w.shape, dtype=torch.int32)
    for j in range(num_groups):
        cols = (g_idx == j).nonzero().flatten()
        block = w[:, cols].double()
        if sym:
            zero = torch.full((n,), 2 ** (bits - 1), dtype=torch.int32)
            scale = (block.abs().amax(dim=1) / (2 ** (bits - 1) - 1)).clamp_min(1e-4)
        else:
            lo, hi = block.amin(dim=1).clamp(max=0), block.amax(dim=1).clamp(min=0)
            scale = ((hi - lo) / maxq).clamp_min(1e-4)
            zero = torch.round(-lo / scale.half().double()).clamp(min_zero, maxq).to(torch.int32)
        scale16 = scale.half()
        qb = torch.round(block / scale16.double()[:, None]) + zero[:, None]
        q[:, cols] = qb.clamp(0, maxq).to(torch.int32)
        scales[:, j], zeros[:, j] = scale16, zero
    return q, scales, zeros


def dequantize_groups(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor):
    """float32 [N, K] from the quantize_groups triple (the test's reference arithmetic)."""
    g = g_idx.long()
    return ((q - zeros[:, g]).float() * scales[:, g].float()).float()


def _pack(values: list[int], bits: int) -> int:
    """One 32-bit word holding values[i] at bits [i * bits, (i + 1) * bits), as a signed int32."""
    word = 0
    for i, v in enumerate(values):
        assert 0 <= v < 2**bits
        word |= v << (i * bits)
    return word - 2**32 if word >= 2**31 else word


def _unpack(word: int, bits: int) -> list[int]:
    word &= 0xFFFFFFFF
    return [(word >> (i * bits)) & (2**bits - 1) for i in range(32 // bits)]


def pack_rows(m: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 [R, C * bits / 32]: each row's consecutive values packed into words (optionally permuted within
    each word by `order`: slot i holds value order[i])."""
    per = 32 // bits
    order = order or tuple(range(per))
    rows = m.tolist()
    out = [[_pack([r[c + order[i]] for i in range(per)], bits) for c in range(0, len(r), per)] for r in rows]
    return torch.tensor(out, dtype=torch.int32)


def unpack_rows(p: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    per = 32 // bits
    order = order or tuple(range(per))
    out = []
    for row in p.tolist():
        values: list[int] = []
        for word in row:
            slots = _unpack(word, bits)
            chunk = [0] * per
            for i in range(per):
                chunk[order[i]] = slots[i]
            values += chunk
        out.append(values)
    return torch.tensor(out, dtype=torch.int32)


# ---- checkpoint writers ------------------------------------------------------------------------------------

def _copy_model(src: Path, dst: Path, quantization_config: dict) -> dict[str, torch.Tensor]:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(config, indent=1))
    return load_file(str(src / "model.safetensors"))


def _save(dst: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})


def write_awq(src: Path, dst: Path, group_size: int = 32) -> dict[str, torch.Tensor]:
    """An AWQ GEMM checkpoint of the model in src; returns name -> the float32 weight it encodes."""
    state = _copy_model(src, dst, {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                   "zero_point": True, "version": "gemm"})
    out, ref = {}, {}
    for name, w in state.items():
        if not is_quantized_linear(name):
            out[name] = w
            continue
        n, k = w.shape
        g_idx = torch.arange(k) // group_size
        q, scales, zeros = quantize_groups(w.float(), 4, g_idx, k // group_size, sym=False)
        base = name.removesuffix(".weight")
        out[f"{base}.qweight"] = pack_rows(q.T, 4, AWQ_ORDER)  # [K, N/8]
        out[f"{base}.qzeros"] = pack_rows(zeros.T, 4, AWQ_ORDER)  # [K/g, N/8]
        out[f"{base}.scales"] = scales.T.contiguous()  # [K/g, N]
        ref[name] = read_awq(out[f"{base}.qweight"], out[f"{base}.qzeros"], out[f"{base}.scales"], group_size)
    _save(dst, out)
    return ref


def read_awq(qweight, qzeros, scales, group_size: int) -> torch.Tensor:
    """Reference dequantization of one AWQ GEMM layer: float32 [N, K]."""
    q = unpack_rows(qweight, 4, AWQ_ORDER)  # [K, N]
    z = unpack_rows(qzeros, 4, AWQ_ORDER)  # [K/g, N]
    g = torch.arange(q.shape[0]) // group_size
    return ((q - z[g]).float() * scales[g].float()).T.contiguous()


def write_gptq(src: Path, dst: Path, group_size: int = 32, bits: int = 4, sym: bool = True,
               desc_act: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """A GPTQ (v1) checkpoint; with desc_act the input channels are grouped in a random permutation per
    layer input (q/k/v share one, as gate/up do: GPTQ orders by the Hessian of the shared input)."""
    state = _copy_model(src, dst, {"quant_method": "gptq", "bits": bits, "group_size": group_size,
                                   "desc_act": desc_act, "sym": sym, "checkpoint_format": "gptq",
                                   "static_groups": False, "true_sequential": True, "damp_percent": 0.01})
    gen = torch.Generator().manual_seed(seed)
    perms: dict[tuple[str, int], torch.Tensor] = {}
    out, ref = {}, {}
    for name, w in state.items():
        if not is_quantized_linear(name):
            out[name] = w
            continue
        n, k = w.shape
        layer = name.split(".mlp.")[0].split(".self_attn.")[0]
        shared_input = "qkv" if any(p in name for p in ("q_proj", "k_proj", "v_proj")) else \
            "gate_up" if any(p in name for p in ("gate_proj", "up_proj")) else name
        if desc_act:
            key = (f"{layer}.{shared_input}", k)
            if key not in perms:
                perms[key] = torch.randperm(k, generator=gen)
            g_idx = torch.empty(k, dtype=torch.int32)
            g_idx[perms[key]] = (torch.arange(k) // group_size).to(torch.int32)
        else:
            g_idx = (torch.arange(k) // group_size).to(torch.int32)
        q, scales, zeros = quantize_groups(w.float(), bits, g_idx, k // group_size, sym=sym, min_zero=1)
        base = name.removesuffix(".weight")
        out[f"{base}.qweight"] = pack_rows(q, bits).T.contiguous()  # [K*b/32, N]: packed along K
        out[f"{base}.qzeros"] = pack_rows((zeros - 1).T, bits)  # [K/g, N*b/32], v1 stores z - 1
        out[f"{base}.scales"] = scales.T.contiguous()  # [K/g, N]
        out[f"{base}.g_idx"] = g_idx
        ref[name] = read_gptq(out[f"{base}.qweight"], out[f"{base}.qzeros"], out[f"{base}.scales"],
                              out[f"{base}.g_idx"], bits)
    _save(dst, out)
    return ref


def read_gptq(qweight, qzeros, scales, g_idx, bits: int) -> torch.Tensor:
    """Reference dequantization of one GPTQ v1 layer: float32 [N, K]."""
    q = unpack_rows(qweight.T.contiguous(), bits)  # [N, K]
    z = unpack_rows(qzeros, bits) + 1  # [K/g, N]
    g = g_idx.long()
    return (q - z[g].T).float() * scales[g].T.float()


def write_compressed_tensors(src: Path, dst: Path, bits: int = 4, group_size: int | None = 32,
                             sym: bool = True, fmt: str = "pack-quantized", actorder: bool = False,
                             seed: int = 0) -> dict[str, torch.Tensor]:
    """An llm-compressor pack-quantized W4A16 / W8A16 checkpoint; group_size None: per output channel.
    fmt="int-quantized": int8 weights unpacked (weight int8 [N, K], weight_scale [N, 1]), symmetric 8-bit only.
    actorder: groups of input channels in a random permutation per layer input (actorder "group"), stored as
    weight_g_idx."""
    assert fmt == "pack-quantized" or (bits == 8 and sym and group_size is None)
    assert not actorder or group_size
    weights = {"num_bits": bits, "type": "int", "symmetric": sym, "dynamic": False,
               "strategy": "group" if group_size else "channel", "group_size": group_size,
               "actorder": "group" if actorder else None}
    state = _copy_model(src, dst, {
        "quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None}},
        "ignore": ["lm_head"], "kv_cache_scheme": None,
    })
    out, ref = {}, {}
    offset = 2 ** (bits - 1)
    gen = torch.Generator().manual_seed(seed)
    perms: dict[tuple[str, int], torch.Tensor] = {}
    for name, w in state.items():
        if not is_quantized_linear(name):
            out[name] = w
            continue
        n, k = w.shape
        gs = group_size or k
        base = name.removesuffix(".weight")
        g_idx = (torch.arange(k) // gs).to(torch.int32)
        if actorder:  # one permutation per shared input (q/k/v, gate/up), as GPTQ orders them
            layer = name.split(".mlp.")[0].split(".self_attn.")[0]
            shared = "qkv" if any(p in name for p in ("q_proj", "k_proj", "v_proj")) else \
                "gate_up" if any(p in name for p in ("gate_proj", "up_proj")) else name
            key = (f"{layer}.{shared}", k)
            if key not in perms:
                perms[key] = torch.randperm(k, generator=gen)
            g_idx = torch.empty(k, dtype=torch.int32)
            g_idx[perms[key]] = (torch.arange(k) // gs).to(torch.int32)
            out[f"{base}.weight_g_idx"] = g_idx
        q, scales, zeros = quantize_groups(w.float(), bits, g_idx, k // gs, sym=sym)
        if fmt == "int-quantized":
            out[name] = (q - offset).to(torch.int8)
            out[f"{base}.weight_scale"] = scales
            ref[name] = out[name].float() * scales.float()
            continue
        # compressed-tensors holds signed values q - 2^(b-1) and stores them + 2^(b-1): the unsigned q here.
        out[f"{base}.weight_packed"] = pack_rows(q, bits)
        out[f"{base}.weight_scale"] = scales
        out[f"{base}.weight_shape"] = torch.tensor([n, k], dtype=torch.int32)
        if not sym:
            out[f"{base}.weight_zero_point"] = pack_rows(zeros.T, bits).T.contiguous()  # [N*b/32, G]
        ref[name] = read_compressed_tensors(out, base, bits, gs, offset)
    _save(dst, out)
    return ref


def read_compressed_tensors(tensors: dict, base: str, bits: int, group_size: int, offset: int) -> torch.Tensor:
    n, k = tensors[f"{base}.weight_shape"].tolist()
    q = unpack_rows(tensors[f"{base}.weight_packed"], bits)[:, :k] - offset  # signed
    if f"{base}.weight_zero_point" in tensors:
        zp = unpack_rows(tensors[f"{base}.weight_zero_point"].T.contiguous(), bits).T[:n] - offset
    else:
        zp = torch.zeros(n, k // group_size, dtype=torch.int32)
    g = tensors[f"{base}.weight_g_idx"].long() if f"{base}.weight_g_idx" in tensors else torch.arange(k) // group_size
    return (q - zp[:, g]).float() * tensors[f"{base}.weight_scale"][:, g].float()


def write_fp8(src: Path, dst: Path, per_channel: bool = False) -> dict[str, torch.Tensor]:
    """An FP8 checkpoint: per tensor as vLLM's `quant_method: fp8` (dynamic activations) writes it, per
    channel as llm-compressor's FP8_DYNAMIC (compressed-tensors float-quantized)."""
    if per_channel:
        qcfg = {"quant_method": "compressed-tensors", "format": "float-quantized",
                "quantization_status": "compressed", "ignore": ["lm_head"],
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                    "num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": "channel"},
                    "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True,
                                          "strategy": "token"}}}}
    else:
        qcfg = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    state = _copy_model(src, dst, qcfg)
    fmax = torch.finfo(torch.float8_e4m3fn).max
    out, ref = {}, {}
    for name, w in state.items():
        if not is_quantized_linear(name):
            out[name] = w
            continue
        w = w.float()
        amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
        scale = (amax / fmax).clamp_min(1e-12).float()
        q = (w / scale).clamp(-fmax, fmax).to(torch.float8_e4m3fn)
        base = name.removesuffix(".weight")
        out[name] = q
        out[f"{base}.weight_scale"] = scale
        ref[name] = q.float() * scale
    _save(dst, out)
    return ref


def dequantized_reference(src: Path, weights: dict[str, torch.Tensor]):
    """The transformers model of src (float32) holding the dequantized weights."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    state = model.state_dict()
    missing = [name for name in weights if name not in state]
    assert not missing, missing
    with torch.no_grad():
        for name, w in weights.items():
            state[name].copy_(w)
    return model
