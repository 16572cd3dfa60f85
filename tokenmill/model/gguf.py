"""Convert a llama.cpp GGUF file into a Hugging Face-style model directory.

The rest of tokenmill loads one format: a directory with config.json, model.safetensors and tokenizer.json.
A GGUF file is turned into that once (default_model.prepare_model caches the result), so the loader, the
tokenizer and transformers (the reference in tests) all read the same files.

What the conversion does:
- config.json: a LlamaConfig built from the `llama.*` metadata keys.
- model.safetensors: every tensor renamed to transformers' names, and the q_proj / k_proj rows put back in
  Hugging Face order (llama.cpp interleaves them for its RoPE kernel). Tensors stored as F16, BF16 or F32 in
  the GGUF keep that dtype (bit-exact copy). Quantized matrices (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K) stay quantized:
  their raw GGUF blocks are copied as uint8 [rows, row_bytes] (a row permutation moves whole blocks), and
  config.json's quantization_config ({"quant_method": "gguf", "tensor_types": {name: type}}) tells the
  loader to repack them into its kernels (tokenmill/model/quantization/gguf.py). The cache is about the size of
  the GGUF file. The file is written one tensor at a time.
- tokenizer.json / tokenizer_config.json / generation_config.json: rebuilt from the `tokenizer.*` metadata with
  the `tokenizers` library (byte-level BPE for tokenizer.ggml.model "gpt2", SentencePiece-style BPE with byte
  fallback for "llama").
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, ReaderField, ReaderTensor
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

from tokenmill.model.tokenizer import byte_level_alphabet

SUPPORTED_ARCHITECTURES = ("llama",)

# Tensor types this converter reads. Others (Q5_K, IQ*, ...) would need their own test coverage first.
SUPPORTED_TENSOR_TYPES = (
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q4_K,
    GGMLQuantizationType.Q6_K,
)

# llama.cpp token types (gguf.TokenType), stored per token in tokenizer.ggml.token_type.
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# GGUF tensor name -> Hugging Face name. Per-layer names are relative to blk.N / model.layers.N.
_GLOBAL_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSOR_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_TENSOR_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
# Llama 3.x files store their RoPE frequency scaling as this tensor; it becomes config.rope_scaling.
_ROPE_FREQS_TENSOR = "rope_freqs.weight"

# Pre-tokenizer regexes, keyed by tokenizer.ggml.pre (llama.cpp's llama-vocab.cpp and the original models'
# tokenizer.json files).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_PRE = ("default", "gpt2", "gpt-2")
# StarCoder-style: every digit is its own pre-token, then GPT-2's byte-level split. SmolLM2 uses this.
_DIGITS_THEN_GPT2_PRE = ("smollm", "starcoder", "refact")
_SPLIT_PRE = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}
SUPPORTED_PRE_TOKENIZERS = (*_GPT2_PRE, *_DIGITS_THEN_GPT2_PRE, *_SPLIT_PRE)

# Hugging Face's default Llama 3.1 / 3.2 "llama3" RoPE scaling parameters; rope_freqs.weight is checked
# against them (only the factor varies between those models).
_LLAMA3_ROPE_DEFAULTS = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

_SAFETENSORS_DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1}
# Quantized types kept as raw blocks in the converted cache (and run by the quantized kernels).
_KEPT_QUANTIZED = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K")


def convert_gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, show_progress: bool = True,
                       keep_quantized: bool = True) -> Path:
    """Write a Hugging Face-style Llama directory for `gguf_path` into `out_dir` and return `out_dir`.

    keep_quantized=False dequantizes every quantized matrix to bfloat16 instead (a directory transformers and
    other engines can load; the engine's own cache keeps the blocks).

    Raises FileNotFoundError when the file is missing, ValueError when it is not a readable GGUF, has an
    architecture other than SUPPORTED_ARCHITECTURES, or holds a tensor type or tokenizer this converter
    cannot read. Everything is validated before the first file is written.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    reader = _open_reader(gguf_path)
    metadata = _GGUFMetadata(reader, gguf_path)

    architecture = metadata.get("general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{gguf_path}: GGUF architecture {architecture!r} is not supported; supported architectures: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}. Use a Llama-family GGUF or a Hugging Face model directory."
        )

    tensors_by_name = {tensor.name: tensor for tensor in reader.tensors}
    hparams = _LlamaHParams.from_metadata(metadata, reader)
    plans = _plan_tensors(gguf_path, hparams, tensors_by_name, keep_quantized)
    rope_scaling = _rope_scaling(metadata, hparams, tensors_by_name.get(_ROPE_FREQS_TENSOR))
    tokenizer, tokenizer_config, special_ids = _build_tokenizer(metadata, hparams)

    out_dir.mkdir(parents=True, exist_ok=True)
    config = _llama_config(hparams, plans, rope_scaling, special_ids)
    _write_json(out_dir / "config.json", config)
    generation_config = {"bos_token_id": special_ids.get("bos"), "eos_token_id": special_ids["eos_all"]}
    _write_json(
        out_dir / "generation_config.json", {k: v for k, v in generation_config.items() if v is not None}
    )
    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_safetensors(
        out_dir / "model.safetensors",
        plans,
        lambda plan: _load_tensor(tensors_by_name[plan.gguf_name], plan),
        show_progress=show_progress,
        description=f"Converting {gguf_path.name}",
    )
    return out_dir


# ---------------------------------------------------------------------------------------------------------------
# Reading the file


def _open_reader(gguf_path: Path) -> GGUFReader:
    if not gguf_path.exists():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}. Check the path.")
    if not gguf_path.is_file():
        raise ValueError(f"{gguf_path} is not a file: pass the path of a .gguf file.")
    try:
        reader = GGUFReader(gguf_path)
    except Exception as e:  # the reader raises ValueError, IndexError, struct/numpy errors... on bad bytes
        raise ValueError(
            f"{gguf_path} is not a readable GGUF file ({type(e).__name__}: {e}). The file is corrupt, truncated "
            "or not GGUF: download or export it again."
        ) from e
    if reader.byte_order != "I":
        raise ValueError(f"{gguf_path} is a big-endian GGUF file; only little-endian files are supported.")
    return reader


class _GGUFMetadata:
    """Typed access to a GGUF file's key/value metadata; errors name the file and the key."""

    def __init__(self, reader: GGUFReader, path: Path):
        self.fields: dict[str, ReaderField] = dict(reader.fields)
        self.path = path

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self.fields.get(key)
        return default if field is None else _field_value(field)

    def require(self, key: str) -> Any:
        if key not in self.fields:
            raise ValueError(
                f"{self.path}: required GGUF metadata key {key!r} is missing; the file is incomplete."
            )
        return self.get(key)


def _field_value(field: ReaderField) -> Any:
    """The Python value of a metadata field (str, int, float, bool or a list of those)."""
    main_type = field.types[0]
    if main_type == GGUFValueType.ARRAY:
        item_type = field.types[-1] if len(field.types) > 1 else None
        if not field.data or item_type is None:
            return []
        if item_type == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        if item_type == GGUFValueType.ARRAY:
            return None  # nested arrays are not used by any key this converter reads
        return np.concatenate([field.parts[i] for i in field.data]).tolist()
    if main_type == GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8", errors="replace")
    return field.parts[-1].tolist()[0]


def _float32_value(value: float) -> float:
    """A float32 metadata value as the short decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


@dataclass(frozen=True)
class _LlamaHParams:
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    vocab_size: int

    @classmethod
    def from_metadata(cls, metadata: _GGUFMetadata, reader: GGUFReader) -> _LlamaHParams:
        """The numbers of the model, as the planner's ModelArch reads them from the metadata (one parser for
        GGUF files), checked for what this converter writes."""
        from tokenmill.planner.arch import ModelArch

        try:
            arch = ModelArch.from_gguf(reader)
        except ValueError as e:
            raise ValueError(f"{metadata.path}: {e}; the file is incomplete.") from e
        rope_dim = int(metadata.get("llama.rope.dimension_count", arch.head_dim))
        if rope_dim != arch.head_dim:
            raise ValueError(
                f"{metadata.path}: rope.dimension_count={rope_dim} differs from head_dim={arch.head_dim}; partial "
                "rotary embeddings are not part of the Llama architecture this converter supports."
            )
        metadata.require("llama.attention.layer_norm_rms_epsilon")
        return cls(
            num_hidden_layers=arch.num_layers,
            hidden_size=arch.hidden_size,
            intermediate_size=arch.intermediate_size,
            num_attention_heads=arch.num_attention_heads,
            num_key_value_heads=arch.num_kv_heads,
            head_dim=arch.head_dim,
            rms_norm_eps=arch.rms_norm_eps,
            rope_theta=arch.rope_theta if arch.rope_theta is not None else 10000.0,
            max_position_embeddings=arch.max_position_embeddings,
            vocab_size=arch.vocab_size,
        )


# ---------------------------------------------------------------------------------------------------------------
# Tensors


@dataclass(frozen=True)
class _TensorPlan:
    """One output tensor: where it comes from and how it is stored."""

    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]  # Hugging Face layout: [out_features, in_features] for matrices
    dtype: str  # safetensors dtype: F32 / F16 / BF16, or U8 for raw quantized blocks
    rope_num_heads: int | None  # q_proj / k_proj: heads whose rows llama.cpp interleaved; None otherwise
    gguf_type: str | None = None  # the block type of a matrix kept quantized
    row_bytes: int = 0  # bytes per row of a matrix kept quantized

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape written: [rows, row_bytes] of raw blocks for a quantized matrix, else shape."""
        return (self.shape[0], self.row_bytes) if self.gguf_type else self.shape

    @property
    def num_bytes(self) -> int:
        return math.prod(self.stored_shape) * _SAFETENSORS_DTYPE_SIZES[self.dtype]


def _plan_tensors(path: Path, hparams: _LlamaHParams, tensors: dict[str, ReaderTensor],
                  keep_quantized: bool = True) -> list[_TensorPlan]:
    """Map every GGUF tensor to its output tensor, failing on unknown names, types and missing tensors."""
    plans = []
    for name, tensor in tensors.items():
        if name == _ROPE_FREQS_TENSOR:
            continue  # becomes config.rope_scaling
        hf_name = _hf_tensor_name(name, hparams.num_hidden_layers)
        if hf_name is None:
            layer_names = ", ".join(k.removesuffix(".weight") for k in _LAYER_TENSOR_NAMES)
            raise ValueError(
                f"{path}: tensor {name!r} is not part of the Llama architecture (token_embd, output_norm, output "
                f"and blk.N.{{{layer_names}}}); this GGUF is not a plain Llama model."
            )
        if tensor.tensor_type not in SUPPORTED_TENSOR_TYPES:
            raise ValueError(
                f"{path}: tensor {name!r} has type {tensor.tensor_type.name}, which this converter does not "
                f"read; supported types: {', '.join(t.name for t in SUPPORTED_TENSOR_TYPES)}. Use a GGUF "
                "quantized to one of these."
            )
        dtype = {
            GGMLQuantizationType.F32: "F32",
            GGMLQuantizationType.F16: "F16",
            GGMLQuantizationType.BF16: "BF16",
        }.get(tensor.tensor_type, "BF16")  # quantized: dequantized, stored in bfloat16
        rope_num_heads = None
        if name.endswith(".attn_q.weight"):
            rope_num_heads = hparams.num_attention_heads
        elif name.endswith(".attn_k.weight"):
            rope_num_heads = hparams.num_key_value_heads
        # GGUF lists dims fastest-first (ggml's ne); numpy / torch list them slowest-first.
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        expected_shape = _expected_shape(hf_name, hparams)
        if shape != expected_shape:
            raise ValueError(
                f"{path}: tensor {name!r} has shape {list(shape)} but the metadata implies {list(expected_shape)}; "
                "the file is inconsistent."
            )
        gguf_type, row_bytes = None, 0
        if keep_quantized and tensor.tensor_type.name in _KEPT_QUANTIZED and len(shape) == 2:
            gguf_type, dtype = tensor.tensor_type.name, "U8"
            row_bytes = int(tensor.data.shape[-1])
        plans.append(_TensorPlan(name, hf_name, shape, dtype, rope_num_heads, gguf_type, row_bytes))

    expected = set(_GLOBAL_TENSOR_NAMES) - {"output.weight"}
    expected |= {
        f"blk.{i}.{suffix}" for i in range(hparams.num_hidden_layers) for suffix in _LAYER_TENSOR_NAMES
    }
    missing = sorted(expected - set(tensors))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{path}: the file lacks tensors {shown}; it is incomplete or not a Llama model.")
    return plans


def _expected_shape(hf_name: str, hparams: _LlamaHParams) -> tuple[int, ...]:
    """Hugging Face shape of a Llama tensor: [out_features, in_features] for matrices."""
    hidden, inter, head_dim = hparams.hidden_size, hparams.intermediate_size, hparams.head_dim
    q_size, kv_size = hparams.num_attention_heads * head_dim, hparams.num_key_value_heads * head_dim
    suffix = hf_name.rsplit(".", 2)[-2]  # "model.layers.3.self_attn.q_proj.weight" -> "q_proj"
    return {
        "embed_tokens": (hparams.vocab_size, hidden),
        "lm_head": (hparams.vocab_size, hidden),
        "norm": (hidden,),
        "input_layernorm": (hidden,),
        "post_attention_layernorm": (hidden,),
        "q_proj": (q_size, hidden),
        "k_proj": (kv_size, hidden),
        "v_proj": (kv_size, hidden),
        "o_proj": (hidden, q_size),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }[suffix]


def _hf_tensor_name(gguf_name: str, num_layers: int) -> str | None:
    if gguf_name in _GLOBAL_TENSOR_NAMES:
        return _GLOBAL_TENSOR_NAMES[gguf_name]
    match = _LAYER_TENSOR_RE.match(gguf_name)
    if match is None or match.group(2) not in _LAYER_TENSOR_NAMES or int(match.group(1)) >= num_layers:
        return None
    return f"model.layers.{int(match.group(1))}.{_LAYER_TENSOR_NAMES[match.group(2)]}"


def _load_tensor(tensor: ReaderTensor, plan: _TensorPlan) -> np.ndarray:
    """The tensor's values in Hugging Face layout, as a C-contiguous array of plan.dtype."""
    if tensor.tensor_type == GGMLQuantizationType.F16:
        data = tensor.data  # float16, kept as is
    elif tensor.tensor_type == GGMLQuantizationType.BF16:
        data = tensor.data.view(np.uint16)  # raw bfloat16 bits (numpy has no bfloat16), copied bit-exact
    elif tensor.tensor_type == GGMLQuantizationType.F32:
        data = tensor.data
    elif plan.gguf_type is not None:
        data = tensor.data  # raw blocks, uint8 [rows, row_bytes]
    else:
        data = _to_bfloat16_bits(dequantize(tensor.data, tensor.tensor_type))  # float32 -> bfloat16
    data = data.reshape(plan.stored_shape)
    if plan.rope_num_heads is not None:
        data = _unpermute_rope_rows(data, plan.rope_num_heads)
    return np.ascontiguousarray(data)


def _to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 by torch (nearest even, as the engine's .to(torch.bfloat16)), as the
    raw 16-bit patterns (numpy has no bfloat16)."""
    import torch

    rounded = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16)
    return rounded.view(torch.int16).numpy().view(np.uint16)


def _unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation.

    Hugging Face's rotate_half pairs row i of a head with row i + head_dim/2; llama.cpp's converter reorders each
    head's rows so the pairs are adjacent (2i, 2i + 1):
        gguf = hf.reshape(num_heads, 2, head_dim // 2, in).swapaxes(1, 2).reshape(out, in)
    This is its inverse.
    """
    num_rows = weight.shape[0]
    head_dim = num_rows // num_heads
    # [num_heads, head_dim // 2, 2, in] -> [num_heads, 2, head_dim // 2, in]
    return weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _write_safetensors(
    path: Path,
    plans: list[_TensorPlan],
    load: Callable[[_TensorPlan], np.ndarray],
    show_progress: bool,
    description: str,
) -> None:
    """Write a .safetensors file tensor by tensor (the safetensors library needs every tensor in memory at once).

    Format: 8-byte little-endian header size, a JSON header {name: {dtype, shape, data_offsets}}, then the raw
    little-endian data. Wider dtypes come first so every tensor starts aligned to its element size.
    """
    ordered = sorted(plans, key=lambda plan: -_SAFETENSORS_DTYPE_SIZES[plan.dtype])
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for plan in ordered:
        header[plan.hf_name] = {
            "dtype": plan.dtype,
            "shape": list(plan.stored_shape),
            "data_offsets": [offset, offset + plan.num_bytes],
        }
        offset += plan.num_bytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # the data then starts 8-byte aligned

    with open(path, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for plan in tqdm(ordered, desc=description, unit="tensor", disable=not show_progress):
            data = load(plan)
            assert data.nbytes == plan.num_bytes, (plan, data.shape, data.dtype)  # internal invariant
            f.write(data.astype(data.dtype.newbyteorder("<"), copy=False).data)


# ---------------------------------------------------------------------------------------------------------------
# config.json


def _rope_scaling(
    metadata: _GGUFMetadata, hparams: _LlamaHParams, rope_freqs: ReaderTensor | None
) -> dict[str, Any] | None:
    """config.rope_scaling from rope.scaling.* metadata, or from Llama 3's rope_freqs.weight tensor."""
    path = metadata.path
    if rope_freqs is not None:
        return _llama3_rope_scaling(
            path, dequantize(rope_freqs.data, rope_freqs.tensor_type).reshape(-1), hparams
        )
    scaling_type = metadata.get("llama.rope.scaling.type")
    factor = metadata.get("llama.rope.scaling.factor", metadata.get("llama.rope.scale_linear"))
    if scaling_type is None and factor is not None:
        scaling_type = "linear"  # older files only have rope.scale_linear
    if scaling_type in (None, "none") or factor in (None, 1.0):
        return None
    if scaling_type == "linear":
        return {"rope_type": "linear", "factor": _float32_value(factor)}
    if scaling_type == "yarn":
        original = metadata.get("llama.rope.scaling.original_context_length")
        if original is None:
            raise ValueError(f"{path}: YaRN RoPE scaling without rope.scaling.original_context_length.")
        return {
            "rope_type": "yarn",
            "factor": _float32_value(factor),
            "original_max_position_embeddings": int(original),
        }
    raise ValueError(
        f"{path}: RoPE scaling type {scaling_type!r} is not supported (supported: linear, yarn, and Llama 3's "
        "rope_freqs tensor)."
    )


def _llama3_rope_scaling(path: Path, divisors: np.ndarray, hparams: _LlamaHParams) -> dict[str, Any] | None:
    """Recover Hugging Face's "llama3" rope_scaling from the per-frequency divisors llama.cpp stored.

    llama.cpp's converter computes, for each RoPE frequency with wavelength w = 2*pi / freq:
        divisor = 1                                  if w < high_wavelen  (= original / high_freq_factor)
                = factor                             if w > low_wavelen   (= original / low_freq_factor)
                = 1 / ((1 - s) / factor + s)         otherwise, s = (original / w - low) / (high - low)
    factor is the largest divisor, and s is linear in 1/w, so two divisors inside the band give both band
    edges. (Only the edges matter, so low_freq_factor = 1 and original = low_wavelen describe the same
    scaling.) With fewer than two, Llama 3.1's defaults are tried. The result is checked against the tensor.
    """
    factor = float(divisors.max())
    if factor <= 1.0:
        return None
    dim = hparams.head_dim
    inv_freq = 1.0 / (hparams.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    inv_wavelen = inv_freq / (2 * math.pi)
    if divisors.shape != inv_wavelen.shape:
        raise ValueError(
            f"{path}: rope_freqs.weight has {divisors.size} values, expected head_dim / 2 = {inv_wavelen.size}."
        )

    candidates = []
    s = (1.0 / divisors - 1.0 / factor) / (1.0 - 1.0 / factor)
    band = (s > 1e-4) & (s < 1 - 1e-4)
    if band.sum() >= 2:
        slope, intercept = np.polyfit(inv_wavelen[band], s[band], 1)  # s = slope / w + intercept
        if slope > 0 and intercept < 0:
            low_wavelen, high_wavelen = slope / -intercept, slope / (1.0 - intercept)
            original = int(round(low_wavelen))
            candidates.append(
                {
                    "low_freq_factor": 1.0,
                    "high_freq_factor": round(original / high_wavelen, 4),
                    "original_max_position_embeddings": original,
                }
            )
    candidates.append(dict(_LLAMA3_ROPE_DEFAULTS))

    for params in candidates:
        original = params["original_max_position_embeddings"]
        low, high = params["low_freq_factor"], params["high_freq_factor"]
        wavelen = 1.0 / inv_wavelen
        smooth = (original / wavelen - low) / (high - low)
        expected = np.where(
            wavelen < original / high,
            1.0,
            np.where(wavelen > original / low, factor, 1.0 / ((1 - smooth) / factor + smooth)),
        )
        if np.allclose(expected, divisors, rtol=1e-3):
            return {"rope_type": "llama3", "factor": _float32_value(factor), **params}
    raise ValueError(
        f"{path}: rope_freqs.weight does not follow Llama 3 RoPE scaling (factor {factor}); this RoPE scaling is "
        "not supported."
    )


def _llama_config(
    hparams: _LlamaHParams,
    plans: list[_TensorPlan],
    rope_scaling: dict[str, Any] | None,
    special_ids: dict[str, Any],
) -> dict[str, Any]:
    matrix_dtypes = {plan.dtype for plan in plans if len(plan.shape) == 2}
    # The model's dtype: the one every matrix is stored in (float32 or float16 files), else bfloat16 (the
    # dtype of dequantized matrices, and what a mix of dtypes is run in).
    torch_dtype = {"F16": "float16", "F32": "float32"}.get(
        matrix_dtypes.pop() if len(matrix_dtypes) == 1 else "BF16", "bfloat16"
    )
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hparams.hidden_size,
        "intermediate_size": hparams.intermediate_size,
        "num_hidden_layers": hparams.num_hidden_layers,
        "num_attention_heads": hparams.num_attention_heads,
        "num_key_value_heads": hparams.num_key_value_heads,
        "head_dim": hparams.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": hparams.rms_norm_eps,
        "rope_theta": hparams.rope_theta,
        "max_position_embeddings": hparams.max_position_embeddings,
        "vocab_size": hparams.vocab_size,
        "tie_word_embeddings": all(plan.gguf_name != "output.weight" for plan in plans),
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": special_ids.get("bos"),
        "eos_token_id": special_ids.get("eos"),
        "pad_token_id": special_ids.get("pad"),
        "torch_dtype": torch_dtype,
    }
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    tensor_types = {plan.hf_name: plan.gguf_type for plan in plans if plan.gguf_type is not None}
    if tensor_types:
        config["quantization_config"] = {"quant_method": "gguf", "tensor_types": tensor_types}
    return config


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def _build_tokenizer(
    metadata: _GGUFMetadata, hparams: _LlamaHParams
) -> tuple[Tokenizer, dict[str, Any], dict[str, Any]]:
    """(tokenizer.json, tokenizer_config.json content, special token ids) from the tokenizer.* metadata.

    special ids: "bos", "eos", "unk", "pad" (int or None) and "eos_all" (eos plus end-of-turn ids, for
    generation_config.json).
    """
    path = metadata.path
    tokens: list[str] = metadata.require("tokenizer.ggml.tokens")
    token_types: list[int] = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    model_name = metadata.require("tokenizer.ggml.model")
    if len(token_types) != len(tokens):
        raise ValueError(
            f"{path}: {len(tokens)} tokens but {len(token_types)} token types; the file is corrupt."
        )

    special_ids: dict[str, Any] = {}
    for name, key in (
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("unk", "unknown_token_id"),
        ("pad", "padding_token_id"),
    ):
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise ValueError(
                f"{path}: tokenizer.ggml.{key}={token_id} is outside the vocabulary of {len(tokens)}."
            )
        special_ids[name] = token_id
    eos_all = [special_ids["eos"]] if special_ids["eos"] is not None else []
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        token_id = metadata.get(key)
        if token_id is not None and 0 <= token_id < len(tokens) and token_id not in eos_all:
            eos_all.append(token_id)
    special_ids["eos_all"] = eos_all[0] if len(eos_all) == 1 else (eos_all or None)

    if model_name == "gpt2":
        tokenizer = _byte_level_bpe(metadata, tokens)
        add_bos_default = False
    elif model_name == "llama":
        tokenizer = _sentencepiece_bpe(metadata, tokens)
        add_bos_default = True  # llama.cpp adds BOS for SentencePiece vocabularies that do not say otherwise
    else:
        raise ValueError(
            f"{path}: tokenizer model {model_name!r} (tokenizer.ggml.model) is not supported; supported: "
            "'gpt2' (byte-level BPE) and 'llama' (SentencePiece BPE). Use a Hugging Face model directory instead."
        )

    named_ids = {special_ids[name] for name in ("bos", "eos", "unk", "pad") if special_ids[name] is not None}
    byte_alphabet = set(byte_level_alphabet().values())
    special, user_defined = [], []
    for token_id, (token, token_type) in enumerate(zip(tokens, token_types)):
        if token_type == _TOKEN_TYPE_CONTROL or token_id in named_ids:
            # A byte-level vocabulary spells every real token in the byte alphabet; a "control" token that does
            # not is mislabeled by llama.cpp and left alone (as transformers does).
            if model_name == "gpt2" and token_id not in named_ids and not set(token) <= byte_alphabet:
                continue
            special.append(AddedToken(token, special=True, normalized=False))
        elif token_type == _TOKEN_TYPE_USER_DEFINED:
            user_defined.append(AddedToken(token, special=False, normalized=False))
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user_defined)

    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    bos = tokens[special_ids["bos"]] if special_ids["bos"] is not None else None
    eos = tokens[special_ids["eos"]] if special_ids["eos"] is not None else None
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    tokenizer.post_processor = _bos_eos_post_processor(
        tokenizer, bos if add_bos else None, eos if add_eos else None
    )

    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": hparams.max_position_embeddings,
    }
    for name in ("bos", "eos", "unk", "pad"):
        if special_ids[name] is not None:
            tokenizer_config[f"{name}_token"] = tokens[special_ids[name]]
    named_tokens = {tokens[i] for i in named_ids}
    tokenizer_config["additional_special_tokens"] = [
        t.content for t in special if t.content not in named_tokens
    ]
    chat_template = _chat_template(metadata)
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    return tokenizer, tokenizer_config, special_ids


def _bos_eos_post_processor(
    backend: Tokenizer, bos: str | None, eos: str | None
) -> processors.TemplateProcessing:
    """The post-processor that adds `bos` before and `eos` after a sequence (None: nothing), as transformers'
    update_post_processor builds it for add_bos_token / add_eos_token."""
    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    pair = single + " " + " ".join([*([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])])
    special = {token: backend.token_to_id(token) for token in (bos, eos) if token}
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(special.items()))


def _chat_template(metadata: _GGUFMetadata) -> str | list[dict[str, str]] | None:
    """tokenizer.chat_template, plus named variants (tokenizer.chat_template.<name>) in Hugging Face's list form."""
    default = metadata.get("tokenizer.chat_template")
    prefix = "tokenizer.chat_template."
    named = {key.removeprefix(prefix): metadata.get(key) for key in metadata.fields if key.startswith(prefix)}
    if not named:
        return default
    templates = [{"name": "default", "template": default}] if default is not None else []
    return templates + [{"name": name, "template": template} for name, template in sorted(named.items())]


def _byte_level_bpe(metadata: _GGUFMetadata, tokens: list[str]) -> Tokenizer:
    """GPT-2 style byte-level BPE (tokenizer.ggml.model "gpt2")."""
    path = metadata.path
    merges: list[str] | None = metadata.get("tokenizer.ggml.merges")
    if not merges:
        raise ValueError(f"{path}: a byte-level BPE tokenizer needs tokenizer.ggml.merges, which is missing.")
    spelling = byte_level_alphabet()
    alphabet = set(spelling.values())
    # Tokens are stored in the byte alphabet (" " as "Ġ"); the few that are not (added tokens with real spaces)
    # are respelled so the BPE model can find them.
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): token_id
        for token_id, token in enumerate(tokens)
    }
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ValueError(
                f"{path}: merge {merge!r} in tokenizer.ggml.merges is not two space-separated tokens."
            )
        pairs.append((left, right))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(metadata)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _byte_level_pre_tokenizer(metadata: _GGUFMetadata) -> pre_tokenizers.PreTokenizer:
    """How text is split before BPE, from tokenizer.ggml.pre (the model family's regex)."""
    pre = metadata.get("tokenizer.ggml.pre", "default")
    add_prefix_space = bool(metadata.get("tokenizer.ggml.add_space_prefix", False))
    if pre in _GPT2_PRE:
        return pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
    if pre in _DIGITS_THEN_GPT2_PRE:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True),
            ]
        )
    if pre in _SPLIT_PRE:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_PRE[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
            ]
        )
    raise ValueError(
        f"{metadata.path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; supported: "
        f"{', '.join(SUPPORTED_PRE_TOKENIZERS)}. Use the model's Hugging Face directory instead."
    )


def _sentencepiece_bpe(metadata: _GGUFMetadata, tokens: list[str]) -> Tokenizer:
    """SentencePiece BPE (tokenizer.ggml.model "llama"): "▁" for spaces, <0xNN> byte-fallback tokens.

    Built like transformers' LlamaTokenizer (no normalizer, Metaspace prepending "▁" to the first word only), so
    a converted file tokenizes the same as transformers' own GGUF loading. Merges come from the file if present,
    else from the token scores (a higher score merges first).
    """
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    merges = metadata.get("tokenizer.ggml.merges")
    if merges:
        pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    else:
        scores = metadata.get("tokenizer.ggml.scores")
        if not scores or len(scores) != len(tokens):
            raise ValueError(
                f"{metadata.path}: a SentencePiece tokenizer needs tokenizer.ggml.scores for each token."
            )
        pairs = _merges_from_scores(vocab, dict(zip(tokens, scores)))
    add_prefix_space = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix_space else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens is a merge,
    ranked by the merged token's score (best first), ties by piece lengths then ids (transformers' order)."""
    merges = []
    for token, score in scores.items():
        local = [
            (token[:i], token[i:], score)
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]
