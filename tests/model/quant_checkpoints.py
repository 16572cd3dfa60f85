"""Tiny checkpoints in every weight format the engine loads, for tests that run over the quantization registry.

CHECKPOINTS maps each registered method name to a builder (tmp_path, tiny_models, tokenizer_dir) ->
(model directory, the `quantization` argument to pass). A format registered without a builder here fails
tests/planner/test_quant_weight_bytes.py: add one with the format.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from tokenmill.model.quantization.gguf import GGUF_BLOCKS

Builder = Callable[[Path, dict, Path], tuple[Path, str | None]]

# GGUF types of the synthetic converted cache: a Q4_K_M-like mix (q/k Q4_K, v and down Q6_K), every supported type.
GGUF_MIX = {"q_proj": "Q4_K", "k_proj": "Q4_K", "v_proj": "Q6_K", "o_proj": "Q4_0", "gate_proj": "Q4_1",
            "up_proj": "Q4_1", "down_proj": "Q6_K", "embed_tokens": "Q8_0"}
_F16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}


def random_blocks(type_name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random raw GGUF blocks [rows, row_bytes] whose float16 fields hold small finite values."""
    block, nbytes = GGUF_BLOCKS[type_name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    for at in _F16_FIELDS[type_name]:
        scales = rng.uniform(-0.05, 0.05, size=raw.shape[:2]).astype(np.float16)
        raw[..., at:at + 2] = scales.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


def gguf_cache_dir(path: Path, tokenizer_dir: Path, types: dict[str, str] = GGUF_MIX) -> Path:
    """A converted-GGUF directory as tokenmill's cache stores it (raw blocks + quantization_config), with
    random blocks: a Llama of hidden size 256 (K-quants need rows of 256) and tied embeddings."""
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = len(tok["model"]["vocab"]) + sum(1 for t in tok["added_tokens"] if t["content"] not in tok["model"]["vocab"])
    hidden, inter, heads, kv_heads, layers = 256, 512, 4, 2, 2
    head_dim = hidden // heads
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "head_dim": head_dim, "hidden_act": "silu", "rms_norm_eps": 1e-6,
              "rope_theta": 10000.0, "max_position_embeddings": 256, "vocab_size": vocab,
              "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
    shapes = {"q_proj": (hidden, hidden), "k_proj": (kv_heads * head_dim, hidden),
              "v_proj": (kv_heads * head_dim, hidden), "o_proj": (hidden, hidden), "gate_proj": (inter, hidden),
              "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    tensors, tensor_types = {}, {}
    seed = 0
    for i in range(layers):
        for name, (rows, cols) in shapes.items():
            part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"model.layers.{i}.{part}.{name}.weight"
            tensors[key] = torch.from_numpy(random_blocks(types[name], rows, cols, seed))
            tensor_types[key] = types[name]
            seed += 1
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(hidden)
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(hidden)
    tensors["model.embed_tokens.weight"] = torch.from_numpy(random_blocks(types["embed_tokens"], vocab, hidden, seed))
    tensor_types["model.embed_tokens.weight"] = types["embed_tokens"]
    tensors["model.norm.weight"] = torch.ones(hidden)
    config["quantization_config"] = {"quant_method": "gguf", "tensor_types": tensor_types}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "model.safetensors"))
    for f in tokenizer_dir.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    return path


CHECKPOINTS: dict[str, Builder] = {
    "unquantized": lambda tmp, models, tok: (models["qwen2"], None),
    "int8": lambda tmp, models, tok: (models["llama"], "int8"),
    "int4": lambda tmp, models, tok: (models["qwen3"], "int4"),
    "gguf": lambda tmp, models, tok: (gguf_cache_dir(tmp / "gguf", tok), None),
    # Published layouts written by the test quantizer (tests/quant_checkpoints.py).
    "awq": lambda tmp, models, tok: (_written("awq", tmp, models["llama"]), None),
    "gptq": lambda tmp, models, tok: (_written("gptq", tmp, models["qwen2"]), None),
    "compressed-tensors": lambda tmp, models, tok: (_written("compressed-tensors", tmp, models["qwen3"]), None),
    "fp8": lambda tmp, models, tok: (_written("fp8", tmp, models["llama"]), None),
}


def _written(method: str, tmp: Path, src: Path) -> Path:
    from tests import quant_checkpoints as qc

    dst = tmp / method
    if method == "awq":
        qc.write_awq(src, dst, group_size=32)
    elif method == "gptq":  # act-order with zero points, on a model with q/k/v biases and tied embeddings
        qc.write_gptq(src, dst, group_size=32, sym=False, desc_act=True)
    elif method == "compressed-tensors":
        qc.write_compressed_tensors(src, dst, bits=4, group_size=32, sym=False)
    else:
        qc.write_fp8(src, dst)
    return dst
