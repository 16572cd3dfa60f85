"""Element types: activation/KV dtypes and weight precisions, with their sizes in bytes.

Two different things are sized here:

- a *dtype* (activations, KV cache): one element has a fixed size. Accepts the names vLLM users type
  ("bfloat16", "bf16", "half", "fp8", ...) and ``torch.dtype`` objects.
- a *precision* (weights): how a checkpoint stores its linear layers, which may add scales, zero points and
  group indices (AWQ, GPTQ), keep some tensors at 16 bit, or pack elements in blocks (GGUF types).
"""

from __future__ import annotations

import difflib
import math
import sys
from dataclasses import dataclass

# canonical dtype -> bytes per element
DTYPE_BYTES: dict[str, int] = {
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
    "int8": 1,
}

# alias -> canonical dtype
_DTYPE_ALIASES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "f32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
    "fp8": "fp8",
    "float8": "fp8",
    "fp8_e4m3": "fp8_e4m3",
    "fp8_e4m3fn": "fp8_e4m3",
    "float8_e4m3fn": "fp8_e4m3",
    "float8_e4m3fnuz": "fp8_e4m3",
    "fp8_e5m2": "fp8_e5m2",
    "float8_e5m2": "fp8_e5m2",
    "float8_e5m2fnuz": "fp8_e5m2",
    "int8": "int8",
}


def normalize_dtype(dtype: object) -> str:
    """Return the canonical name of ``dtype`` ("float32", "bfloat16", "float16", "fp8", ...).

    Accepts strings in any case and ``torch.dtype`` objects. torch is never imported here: an object can only
    be a ``torch.dtype`` if torch is already loaded.
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if not isinstance(dtype, str):
        raise ValueError(f"dtype must be a string or torch.dtype, got {dtype!r} ({type(dtype).__name__})")
    key = dtype.strip().lower().replace("-", "_")
    if key in _DTYPE_ALIASES:
        return _DTYPE_ALIASES[key]
    hint = difflib.get_close_matches(key, list(_DTYPE_ALIASES), n=3)
    raise ValueError(
        f"unknown dtype {dtype!r}: use one of bfloat16, float16, float32, fp8"
        + (f" (did you mean {', '.join(hint)}?)" if hint else "")
    )


def dtype_bytes(dtype: object) -> int:
    """Bytes per element of an activation or KV-cache dtype."""
    return DTYPE_BYTES[normalize_dtype(dtype)]


# ----------------------------------------------------------------------------------------------------------
# Weight precisions
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFType:
    """A ggml block type: ``block_bytes`` bytes hold ``block_size`` elements."""

    name: str
    block_size: int
    block_bytes: int

    def nbytes(self, numel: int) -> int:
        return math.ceil(numel / self.block_size) * self.block_bytes


GGUF_TYPES: dict[str, GGUFType] = {
    t.name: t
    for t in (
        GGUFType("F32", 1, 4),
        GGUFType("F16", 1, 2),
        GGUFType("BF16", 1, 2),
        GGUFType("Q4_0", 32, 18),  # fp16 scale + 32 x 4 bit
        GGUFType("Q4_1", 32, 20),  # fp16 scale + fp16 min + 32 x 4 bit
        GGUFType("Q5_0", 32, 22),
        GGUFType("Q5_1", 32, 24),
        GGUFType("Q8_0", 32, 34),  # fp16 scale + 32 x int8
        GGUFType("Q2_K", 256, 84),
        GGUFType("Q3_K", 256, 110),
        GGUFType("Q4_K", 256, 144),
        GGUFType("Q5_K", 256, 176),
        GGUFType("Q6_K", 256, 210),
    )
}

# llama.cpp cannot use a 256-element K-quant on a row whose length is not a multiple of 256; it falls back.
_K_QUANT_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def gguf_type_for_row(type_name: str, row_len: int) -> GGUFType:
    """The ggml type llama.cpp actually uses for a tensor whose rows have ``row_len`` elements."""
    gtype = GGUF_TYPES[type_name]
    if gtype.block_size > 1 and row_len % gtype.block_size != 0:
        gtype = GGUF_TYPES[_K_QUANT_FALLBACK.get(type_name, "F16")]
        if gtype.block_size > 1 and row_len % gtype.block_size != 0:
            gtype = GGUF_TYPES["F16"]
    return gtype


@dataclass(frozen=True)
class Precision:
    """How a checkpoint stores its weights.

    kind:
      "dense"  every tensor at ``weight_bytes`` per element (fp32, bf16, fp16).
      "fp8"/"int8"  linear layers at 1 byte plus one fp32 scale per output channel; embeddings, lm_head,
               norms and MoE routers stay at 16 bit.
      "awq"/"gptq"  4-bit linear layers with an fp16 scale and a 4-bit zero point per ``group_size`` inputs of
               each output channel (GPTQ adds an int32 group index per input); the rest stays at 16 bit.
      "gguf"   ggml block types: linear layers and token embeddings at ``gguf_type`` (with llama.cpp's
               choices for the output layer and the "_M" mixes), norms at F32.
    """

    name: str
    kind: str
    weight_bytes: float = 2.0
    group_size: int = 128
    gguf_type: str | None = None
    gguf_mix: str | None = None  # "M": attn_v / ffn_down of half the layers one step up (Q4_K_M, Q5_K_M)

    @property
    def compute_dtype(self) -> str:
        """The dtype activations (and the default KV cache) run in with these weights."""
        if self.kind == "dense" and self.weight_bytes == 4:
            return "float32"
        if self.name == "fp16":
            return "float16"
        return "bfloat16"


_PRECISION_ALIASES: dict[str, str] = {
    "fp32": "fp32",
    "float32": "fp32",
    "f32": "fp32",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "f16": "fp16",
    "fp8": "fp8",
    "float8": "fp8",
    "w8a8-fp8": "fp8",
    "int8": "int8",
    "w8a8": "int8",
    "w8a8-int8": "int8",
    "int4-awq": "int4-awq",
    "awq": "int4-awq",
    "int4-gptq": "int4-gptq",
    "gptq": "int4-gptq",
}

_GGUF_PRECISIONS = [
    "q4_0",
    "q4_1",
    "q5_0",
    "q5_1",
    "q8_0",
    "q2_k",
    "q3_k",
    "q4_k",
    "q5_k",
    "q6_k",
    "q4_k_m",
    "q5_k_m",
]

PRECISION_NAMES: tuple[str, ...] = (
    "fp32",
    "bf16",
    "fp16",
    "fp8",
    "int8",
    "int4-awq",
    "int4-gptq",
    *_GGUF_PRECISIONS,
)


def parse_precision(name: str | Precision, group_size: int = 128) -> Precision:
    """Parse a weight precision name: fp32, bf16, fp16, fp8, int8, int4-awq, int4-gptq, or a GGUF type
    (q4_0, q4_1, q5_0, q5_1, q8_0, q2_k .. q6_k, q4_k_m, q5_k_m)."""
    if isinstance(name, Precision):
        return name
    if not isinstance(name, str):
        raise ValueError(f"precision must be a string such as 'bf16' or 'int4-awq', got {name!r}")
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}: use 128 (the AWQ/GPTQ default)")
    key = name.strip().lower().removeprefix("gguf:")
    canon = _PRECISION_ALIASES.get(key) or _PRECISION_ALIASES.get(key.replace("_", "-"))
    if canon in ("fp32", "bf16", "fp16"):
        return Precision(canon, "dense", weight_bytes={"fp32": 4.0, "bf16": 2.0, "fp16": 2.0}[canon])
    if canon == "fp8":
        return Precision("fp8", "fp8", weight_bytes=1.0)
    if canon == "int8":
        return Precision("int8", "int8", weight_bytes=1.0)
    if canon == "int4-awq":
        return Precision("int4-awq", "awq", weight_bytes=0.5, group_size=group_size)
    if canon == "int4-gptq":
        return Precision("int4-gptq", "gptq", weight_bytes=0.5, group_size=group_size)
    gkey = key.replace("-", "_")
    if gkey in _GGUF_PRECISIONS:
        base, _, mix = gkey.upper().partition("_K_")
        if mix:
            return Precision(gkey, "gguf", gguf_type=f"{base}_K", gguf_mix=mix)
        return Precision(gkey, "gguf", gguf_type=gkey.upper())
    hint = difflib.get_close_matches(name.lower(), list(PRECISION_NAMES) + list(_PRECISION_ALIASES), n=3)
    raise ValueError(
        f"unknown precision {name!r}: use one of {', '.join(PRECISION_NAMES)}"
        + (f" (did you mean {', '.join(hint)}?)" if hint else "")
    )
