"""ModelArch: the numbers of a transformer that decide its memory and speed, read from an HF config.json,
a GGUF file's metadata, or the built-in catalog."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tokenmill.planner.dtypes import normalize_dtype

# Model types whose RMSNorm sits before and after both attention and MLP (4 norms per layer).
_SANDWICH_NORM_TYPES = {"gemma2", "gemma3", "gemma3_text"}
# Model types with per-head RMSNorm on q and k (weights of size head_dim).
_QK_NORM_TYPES = {"qwen3", "qwen3_moe", "gemma3", "gemma3_text"}
# Model types whose q/k/v projections always carry a bias (and o_proj none).
_QKV_BIAS_TYPES = {"qwen2", "qwen2_moe"}
# Model types whose sliding_window applies only when use_sliding_window is true (transformers' default false).
_USE_SLIDING_WINDOW_TYPES = {"qwen2", "qwen2_moe", "qwen3", "qwen3_moe"}
# Model types that tie lm_head to the embeddings when config.json does not say.
_TIED_BY_DEFAULT = {"gemma", "gemma2", "gemma3", "gemma3_text"}


@dataclass(frozen=True)
class ModelArch:
    """Architecture of a decoder-only transformer, as the planner and the engine's KV sizing see it.

    Attention is standard multi-head/grouped-query unless ``kv_lora_rank`` is set (multi-head latent
    attention, DeepSeek-V2/V3). MoE is present when ``num_experts > 0``; ``moe_layers`` lists which layers
    replace their MLP by experts.
    """

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int  # per-head q/k/v size; for MLA the q/k head size qk_nope_head_dim + qk_rope_head_dim
    intermediate_size: int  # dense MLP width
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on q and k (Qwen3, Gemma-3)
    norms_per_layer: int = 2
    gated_mlp: bool = True  # SwiGLU/GeGLU: gate, up and down projections
    rope_theta: float | None = None
    # rope_scaling of config.json (rope_type "linear", "llama3", "yarn", ...), None for plain RoPE.
    rope_scaling: dict[str, Any] | None = field(default=None, compare=False, hash=False)
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    sliding_window: int | None = None
    sliding_window_layers: tuple[int, ...] = ()  # layer indices that attend to the last sliding_window tokens
    # Mixture of experts
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # width of one routed expert
    moe_layers: tuple[int, ...] = ()
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int = 0  # total width of the always-on shared MLP
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid gate on the shared expert
    router_bias: bool = False  # DeepSeek-V3: e_score_correction_bias
    # Multi-head latent attention
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # Outside the language model
    vision_params: int = 0  # vision encoder + projector of a multimodal checkpoint
    # How the checkpoint stores its weights
    dtype: str = "bfloat16"
    quantization: str | None = (
        None  # a precision name (int4-awq, fp8, q4_1, ...) when the checkpoint is quantized
    )
    quant_group_size: int | None = None
    file_weight_bytes: int | None = None  # exact stored bytes of the tensors (GGUF files)
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "num_layers",
            "num_attention_heads",
            "num_kv_heads",
            "head_dim",
            "vocab_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{self.name}: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"{self.name}: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}: fix num_key_value_heads in the config"
            )
        if self.num_experts and self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"{self.name}: num_experts_per_tok={self.num_experts_per_tok} exceeds num_experts={self.num_experts}"
            )
        if self.sliding_window_layers and not self.sliding_window:
            raise ValueError(f"{self.name}: sliding_window_layers given without a sliding_window size")

    # ------------------------------------------------------------------ derived
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0 and bool(self.moe_layers)

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def num_sliding_layers(self) -> int:
        return len(self.sliding_window_layers)

    @property
    def num_full_attention_layers(self) -> int:
        return self.num_layers - self.num_sliding_layers

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_hf_config(cls, config: dict[str, Any], name: str | None = None) -> ModelArch:
        """Build from the dict of a Hugging Face config.json.

        Raises ValueError naming the first required field that is missing.
        """
        return _from_hf_config(config, name)

    @classmethod
    def from_gguf(cls, source: str | Path | Any) -> ModelArch:
        """Build from the metadata of a GGUF file (a path, or an open ``gguf.GGUFReader``); no tensor data is
        read."""
        if isinstance(source, str | Path):
            path = Path(source).expanduser()
            if not path.is_file():
                raise ValueError(f"GGUF file {str(path)!r} does not exist")
            stat = path.stat()
            return _cached_gguf_arch(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        filename = getattr(source, "path", None) or getattr(getattr(source, "data", None), "filename", None)
        return _from_gguf_reader(source, Path(filename or "model.gguf"))


# ----------------------------------------------------------------------------------------------------------
# Hugging Face config.json
# ----------------------------------------------------------------------------------------------------------

_FIELD_HELP = {
    "hidden_size": "the model width",
    "num_hidden_layers": "the number of decoder layers",
    "num_attention_heads": "the number of query heads",
    "intermediate_size": "the MLP width",
    "vocab_size": "the number of token embeddings",
    "model_type": "the architecture name, e.g. 'llama'",
}


def _require(cfg: dict[str, Any], key: str, where: str) -> Any:
    value = cfg.get(key)
    if value is None:
        what = _FIELD_HELP.get(key, "")
        raise ValueError(
            f"{where}: config is missing required field '{key}'"
            + (f" ({what})" if what else "")
            + f": add '{key}' to config.json, or pass a catalog model name instead"
        )
    return value


def _as_int(value: Any, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise ValueError(f"{where}: field '{key}' must be an integer, got {value!r}")
    return int(value)


def _rope_theta(cfg: dict[str, Any]) -> float | None:
    if cfg.get("rope_theta") is not None:
        return float(cfg["rope_theta"])
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if isinstance(params, dict):
        if params.get("rope_theta") is not None:
            return float(params["rope_theta"])
        full = params.get("full_attention")
        if isinstance(full, dict) and full.get("rope_theta") is not None:
            return float(full["rope_theta"])
    return None


def _sliding_layers(
    cfg: dict[str, Any], model_type: str, num_layers: int
) -> tuple[int | None, tuple[int, ...]]:
    window = cfg.get("sliding_window")
    if not window or cfg.get("use_sliding_window") is False:
        return None, ()
    if model_type in _USE_SLIDING_WINDOW_TYPES and not cfg.get("use_sliding_window"):
        return None, ()  # their configs window nothing unless use_sliding_window is set (transformers' default)
    window = int(window)
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == num_layers:
        layers = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
    elif model_type == "gemma2":
        layers = tuple(i for i in range(num_layers) if i % 2 == 0)
    elif model_type in ("gemma3", "gemma3_text"):
        pattern = int(cfg.get("sliding_window_pattern") or 6)
        layers = tuple(i for i in range(num_layers) if (i + 1) % pattern != 0)
    elif model_type in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe"):
        first = int(cfg.get("max_window_layers") or 0)
        layers = tuple(range(first, num_layers))
    else:  # Mistral, Phi-3 and others: every layer
        layers = tuple(range(num_layers))
    return (window, layers) if layers else (None, ())


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """config.json's RoPE scaling (rope_scaling, or transformers >= 5's rope_parameters); None for plain RoPE."""
    params = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    if not isinstance(scaling, dict) and isinstance(params, dict) and params.get("rope_type", "default") != "default":
        scaling = params
    if not isinstance(scaling, dict) or scaling.get("rope_type", scaling.get("type")) == "default":
        return None
    return dict(scaling)


def _quantization(cfg: dict[str, Any]) -> tuple[str | None, int | None]:
    qcfg = cfg.get("quantization_config")
    if not isinstance(qcfg, dict):
        return None, None
    method = str(qcfg.get("quant_method", "")).lower()
    group = qcfg.get("group_size")
    if method == "awq":
        return "int4-awq", int(group or 128)
    if method == "gptq":
        bits = int(qcfg.get("bits", 4))
        if bits == 8:
            return "int8", None
        return "int4-gptq", int(group or 128) if group and group > 0 else 128
    if method in ("fp8", "fbgemm_fp8"):
        return "fp8", None
    if method == "compressed-tensors":
        # llm-compressor keeps the group size in each config group's weight arguments.
        for scheme in (qcfg.get("config_groups") or {}).values():
            weights = scheme.get("weights") if isinstance(scheme, dict) else None
            if isinstance(weights, dict) and weights.get("group_size"):
                group = weights["group_size"]
                break
        text = json.dumps(qcfg).lower()
        if '"float"' in text and '"num_bits": 8' in text:
            return "fp8", None
        if '"num_bits": 4' in text:
            return "int4-gptq", int(group or 128)
        if '"num_bits": 8' in text:
            return "int8", None
    if method == "bitsandbytes":
        return ("int8", None) if qcfg.get("load_in_8bit") else ("int4-gptq", 64)
    return None, None


def _vision_params(vcfg: dict[str, Any], text_hidden: int) -> int:
    """Parameters of a ViT/SigLIP vision tower plus a linear projector into the text model."""
    hidden = int(vcfg.get("hidden_size", 0))
    layers = int(vcfg.get("num_hidden_layers", 0))
    inter = int(vcfg.get("intermediate_size", 0))
    patch = int(vcfg.get("patch_size", 14))
    image = int(vcfg.get("image_size", 224))
    channels = int(vcfg.get("num_channels", 3))
    if not (hidden and layers and inter):
        return 0
    patch_embed = channels * patch * patch * hidden + hidden
    pos_embed = (image // patch) ** 2 * hidden
    per_layer = 4 * (hidden * hidden + hidden) + 2 * hidden * inter + inter + hidden + 2 * 2 * hidden
    post_norm = 2 * hidden
    projector = hidden + hidden * text_hidden  # norm + projection (Gemma-3)
    return patch_embed + pos_embed + layers * per_layer + post_norm + projector


def _from_hf_config(config: dict[str, Any], name: str | None) -> ModelArch:
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict (the parsed config.json), got {type(config).__name__}")
    where = name or config.get("_name_or_path") or "config.json"
    cfg = dict(config)
    vision = None
    if isinstance(cfg.get("text_config"), dict) and "hidden_size" not in cfg:
        # Multimodal wrapper (Gemma-3, Llava, ...): the language model lives in text_config.
        text = dict(cfg["text_config"])
        for key in ("tie_word_embeddings", "torch_dtype", "dtype", "quantization_config"):
            if key in cfg and key not in text:
                text[key] = cfg[key]
        vision = cfg.get("vision_config")
        if not text.get("model_type"):
            text["model_type"] = cfg.get("model_type")
        cfg = text
    model_type = str(_require(cfg, "model_type", where))
    hidden = _as_int(_require(cfg, "hidden_size", where), "hidden_size", where)
    num_layers = _as_int(_require(cfg, "num_hidden_layers", where), "num_hidden_layers", where)
    num_heads = _as_int(_require(cfg, "num_attention_heads", where), "num_attention_heads", where)
    vocab = _as_int(_require(cfg, "vocab_size", where), "vocab_size", where)
    num_kv = _as_int(cfg.get("num_key_value_heads") or num_heads, "num_key_value_heads", where)

    # Mixture of experts: three spellings of "how many experts".
    moe_inter = 0
    moe_layers: tuple[int, ...] = ()
    shared_inter = 0
    num_shared = 0
    num_experts = int(
        cfg.get("n_routed_experts") or cfg.get("num_local_experts") or cfg.get("num_experts") or 0
    )
    if num_experts:
        moe_inter = int(cfg.get("moe_intermediate_size") or 0) or _as_int(
            _require(cfg, "intermediate_size", where), "intermediate_size", where
        )
        if cfg.get("n_routed_experts") or "first_k_dense_replace" in cfg:  # DeepSeek-V2/V3
            first_dense = int(cfg.get("first_k_dense_replace") or 0)
            freq = int(cfg.get("moe_layer_freq") or 1)
            moe_layers = tuple(i for i in range(num_layers) if i >= first_dense and i % freq == 0)
        else:  # Mixtral, Qwen-MoE: every decoder_sparse_step-th layer except mlp_only_layers
            step = int(cfg.get("decoder_sparse_step") or 1)
            dense_only = set(cfg.get("mlp_only_layers") or [])
            moe_layers = tuple(i for i in range(num_layers) if (i + 1) % step == 0 and i not in dense_only)
        num_shared = int(cfg.get("n_shared_experts") or 0)
        shared_inter = num_shared * moe_inter
        if not num_shared and cfg.get("shared_expert_intermediate_size"):  # Qwen2-MoE
            shared_inter = int(cfg["shared_expert_intermediate_size"])
            num_shared = 1
    if num_experts:
        top_k = _as_int(_require(cfg, "num_experts_per_tok", where), "num_experts_per_tok", where)
    else:
        top_k = 0
    if num_experts and len(moe_layers) == num_layers:
        inter = int(cfg.get("intermediate_size") or moe_inter)
    else:
        inter = _as_int(_require(cfg, "intermediate_size", where), "intermediate_size", where)

    # Attention
    kv_lora = cfg.get("kv_lora_rank")
    mla: dict[str, Any] = {}
    if kv_lora:
        nope = _as_int(_require(cfg, "qk_nope_head_dim", where), "qk_nope_head_dim", where)
        rope = _as_int(_require(cfg, "qk_rope_head_dim", where), "qk_rope_head_dim", where)
        v_dim = _as_int(_require(cfg, "v_head_dim", where), "v_head_dim", where)
        q_lora = cfg.get("q_lora_rank")
        mla = dict(
            q_lora_rank=int(q_lora) if q_lora else None,
            kv_lora_rank=int(kv_lora),
            qk_nope_head_dim=nope,
            qk_rope_head_dim=rope,
            v_head_dim=v_dim,
        )
        head_dim = nope + rope
    elif cfg.get("head_dim"):
        head_dim = _as_int(cfg["head_dim"], "head_dim", where)
    else:
        if hidden % num_heads != 0:
            raise ValueError(
                f"{where}: hidden_size={hidden} is not divisible by num_attention_heads={num_heads} and the "
                "config has no 'head_dim': add 'head_dim' to config.json"
            )
        head_dim = hidden // num_heads

    attention_bias = bool(cfg.get("attention_bias", False))
    qkv_bias = model_type in _QKV_BIAS_TYPES or attention_bias
    o_bias = attention_bias and model_type not in _QKV_BIAS_TYPES and not kv_lora
    if kv_lora:
        qkv_bias = False
    window, sliding = _sliding_layers(cfg, model_type, num_layers)
    tied = cfg.get("tie_word_embeddings")
    if tied is None:
        tied = model_type in _TIED_BY_DEFAULT
    max_pos = int(cfg.get("max_position_embeddings") or cfg.get("max_sequence_length") or 0) or 2048
    raw_dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
    try:
        dtype = normalize_dtype(raw_dtype)
    except ValueError:
        dtype = "bfloat16"
    quant, group = _quantization(cfg)
    return ModelArch(
        name=str(name or cfg.get("_name_or_path") or model_type),
        model_type=model_type,
        hidden_size=hidden,
        num_layers=num_layers,
        num_attention_heads=num_heads,
        num_kv_heads=num_heads if kv_lora else num_kv,
        head_dim=head_dim,
        intermediate_size=inter,
        vocab_size=vocab,
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(tied),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=model_type in _QK_NORM_TYPES,
        norms_per_layer=4 if model_type in _SANDWICH_NORM_TYPES else 2,
        gated_mlp=True,
        rope_theta=_rope_theta(cfg),
        rope_scaling=_rope_scaling(cfg),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        hidden_act=str(cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu"),
        sliding_window=window,
        sliding_window_layers=sliding,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=moe_inter,
        moe_layers=moe_layers,
        num_shared_experts=num_shared,
        shared_expert_intermediate_size=shared_inter,
        shared_expert_gate=model_type == "qwen2_moe" and bool(shared_inter),
        router_bias=model_type == "deepseek_v3" or str(cfg.get("topk_method", "")) == "noaux_tc",
        vision_params=_vision_params(vision, hidden) if isinstance(vision, dict) else 0,
        dtype=dtype,
        quantization=quant,
        quant_group_size=group,
        **mla,
    )


# ----------------------------------------------------------------------------------------------------------
# GGUF
# ----------------------------------------------------------------------------------------------------------

# general.architecture -> HF model_type
_GGUF_ARCH_TO_MODEL_TYPE = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen2moe": "qwen2_moe",
    "qwen3": "qwen3",
    "qwen3moe": "qwen3_moe",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
    "deepseek2": "deepseek_v3",
}

# general.file_type (llama_ftype) -> planner precision name
_GGUF_FILE_TYPES = {
    0: "fp32",
    1: "fp16",
    2: "q4_0",
    3: "q4_1",
    7: "q8_0",
    8: "q5_0",
    9: "q5_1",
    10: "q2_k",
    11: "q3_k",
    12: "q3_k",
    13: "q3_k",
    14: "q4_k",
    15: "q4_k_m",
    16: "q5_k",
    17: "q5_k_m",
    18: "q6_k",
    32: "bf16",
}


def _gguf_value(reader: Any, key: str) -> Any:
    fld = reader.fields.get(key)
    if fld is None:
        return None
    if hasattr(fld, "contents"):
        return fld.contents()
    part = fld.parts[fld.data[0]]  # older gguf: scalar values live in parts
    return part.tobytes().decode() if part.dtype.kind == "u" and part.itemsize == 1 else part[0].item()


def _float32_value(value: Any) -> float:
    """A float32 metadata value as the short decimal it was written from (9.99999974e-06 -> 1e-05)."""
    import numpy as np

    return float(str(np.float32(value)))


@functools.lru_cache(maxsize=16)
def _cached_gguf_arch(path: str, mtime_ns: int, size: int) -> ModelArch:
    """Parsing a GGUF's tokenizer arrays takes seconds: read each file version once per process."""
    try:
        from gguf import GGUFReader
    except ImportError as exc:  # pragma: no cover - gguf is a core dependency
        raise ValueError("reading a .gguf file needs the 'gguf' package: pip install gguf") from exc
    return _from_gguf_reader(GGUFReader(path), Path(path))


def _from_gguf_reader(reader: Any, path: Path) -> ModelArch:
    where = path.name
    arch = _gguf_value(reader, "general.architecture")
    if not arch:
        raise ValueError(f"{where}: GGUF metadata has no 'general.architecture': the file is not a model")

    def req(suffix: str) -> Any:
        value = _gguf_value(reader, f"{arch}.{suffix}")
        if value is None:
            raise ValueError(f"{where}: GGUF metadata is missing required field '{arch}.{suffix}'")
        return value

    def opt(suffix: str, default: Any = None) -> Any:
        value = _gguf_value(reader, f"{arch}.{suffix}")
        return default if value is None else value

    tensor_names = {t.name for t in reader.tensors}
    hidden = int(req("embedding_length"))
    num_layers = int(req("block_count"))
    num_heads = int(req("attention.head_count"))
    num_kv = opt("attention.head_count_kv", num_heads)
    if isinstance(num_kv, list):
        num_kv = max(num_kv)
    ffn = req("feed_forward_length")
    if isinstance(ffn, list):
        ffn = max(ffn)
    # The embedding's rows, as {arch}.vocab_size states or the tensor's shape shows; else the tokenizer's size.
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = opt("vocab_size")
    if vocab is None and embedding is not None and len(embedding.shape) == 2:
        vocab = int(embedding.shape[1])
    if vocab is None and tokens is not None:
        vocab = len(tokens.data)
    if not vocab:
        raise ValueError(
            f"{where}: GGUF metadata has neither 'tokenizer.ggml.tokens' nor '{arch}.vocab_size'"
        )
    head_dim = int(opt("attention.key_length", hidden // num_heads))
    model_type = _GGUF_ARCH_TO_MODEL_TYPE.get(arch, arch)

    window = opt("attention.sliding_window")
    sliding: tuple[int, ...] = ()
    if window:
        if arch == "gemma2":
            sliding = tuple(i for i in range(num_layers) if i % 2 == 0)
        elif arch == "gemma3":
            sliding = tuple(i for i in range(num_layers) if (i + 1) % 6 != 0)
        else:
            sliding = tuple(range(num_layers))

    num_experts = int(opt("expert_count", 0) or 0)
    moe: dict[str, Any] = {}
    if num_experts:
        first_dense = int(opt("leading_dense_block_count", 0) or 0)
        moe_inter = int(opt("expert_feed_forward_length", ffn) or ffn)
        num_shared = int(opt("expert_shared_count", 0) or 0)
        shared_inter = int(opt("expert_shared_feed_forward_length", 0) or 0) or num_shared * moe_inter
        moe = dict(
            num_experts=num_experts,
            num_experts_per_tok=int(req("expert_used_count")),
            moe_intermediate_size=moe_inter,
            moe_layers=tuple(range(first_dense, num_layers)),
            num_shared_experts=num_shared,
            shared_expert_intermediate_size=shared_inter if num_shared else 0,
            shared_expert_gate="blk.0.ffn_gate_inp_shexp.weight" in tensor_names,
            router_bias=f"blk.{first_dense}.exp_probs_b.bias" in tensor_names,
        )
    mla: dict[str, Any] = {}
    kv_lora = opt("attention.kv_lora_rank")
    if kv_lora:
        rope = int(req("rope.dimension_count"))
        q_lora = opt("attention.q_lora_rank")
        mla = dict(
            q_lora_rank=int(q_lora) if q_lora else None,
            kv_lora_rank=int(kv_lora),
            qk_nope_head_dim=head_dim - rope,
            qk_rope_head_dim=rope,
            v_head_dim=int(req("attention.value_length")),
        )
        num_kv = num_heads
    file_type = _GGUF_FILE_TYPES.get(int(_gguf_value(reader, "general.file_type") or -1))
    has_post_norms = (
        "blk.0.post_attention_norm.weight" in tensor_names or "blk.0.post_ffw_norm.weight" in tensor_names
    )
    return ModelArch(
        name=str(_gguf_value(reader, "general.name") or path.stem),
        model_type=model_type,
        hidden_size=hidden,
        num_layers=num_layers,
        num_attention_heads=num_heads,
        num_kv_heads=int(num_kv),
        head_dim=head_dim,
        intermediate_size=int(ffn),
        vocab_size=int(vocab),
        max_position_embeddings=int(opt("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        o_bias="blk.0.attn_output.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        norms_per_layer=4 if has_post_norms else 2,
        rope_theta=_float32_value(opt("rope.freq_base")) if opt("rope.freq_base") is not None else None,
        rms_norm_eps=_float32_value(opt("attention.layer_norm_rms_epsilon", 1e-6)),
        sliding_window=int(window) if window else None,
        sliding_window_layers=sliding,
        quantization=file_type,
        file_weight_bytes=sum(int(t.n_bytes) for t in reader.tensors),
        source=str(path),
        **moe,
        **mla,
    )


# ----------------------------------------------------------------------------------------------------------
# One entry point for every kind of source
# ----------------------------------------------------------------------------------------------------------


def load_arch(source: str | Path | ModelArch) -> ModelArch:
    """Load an architecture from a catalog name ("Llama-3.1-8B"), a config.json path, a Hugging Face model
    directory (containing config.json), or a .gguf file."""
    from tokenmill.planner.models import get_model_config, resolve_model_name

    if isinstance(source, ModelArch):
        return source
    text = str(source)
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf":
        return replace(ModelArch.from_gguf(path), source=str(path))
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return load_arch(ggufs[0])
            raise ValueError(
                f"{text!r} is a directory without config.json: point at a Hugging Face model folder"
            )
        return _load_config_file(config_path, name=path.name)
    if path.is_file():
        return _load_config_file(path, name=path.parent.name if path.name == "config.json" else path.stem)
    canonical = resolve_model_name(text)  # raises with close matches
    return replace(ModelArch.from_hf_config(get_model_config(canonical), name=canonical), source="catalog")


def _load_config_file(path: Path, name: str) -> ModelArch:
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}): pass a Hugging Face config.json") from exc
    return replace(ModelArch.from_hf_config(config, name=name or None), source=str(path))


__all__ = ["ModelArch", "load_arch"]
