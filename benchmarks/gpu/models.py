"""Random-weight models with real shapes, built locally (no hub access): speed does not depend on the values.

Each model directory holds config.json (written by transformers' config class, so transformers can load it
too), bf16 safetensors shards written one at a time (an 8B model never sits twice in host memory), and a
word-level tokenizer covering the whole vocabulary so that any sampled id detokenizes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

# name -> (transformers config class, its arguments): the published shapes of each model.
SHAPES: dict[str, tuple[str, dict]] = {
    "llama-3.1-8b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )),
    "qwen2.5-0.5b": ("Qwen2Config", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
        tie_word_embeddings=True, use_sliding_window=False, bos_token_id=151643, eos_token_id=151645,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )),
    # Small stand-ins for a CPU smoke run of the benchmark (--tiny).
    "tiny-llama": ("LlamaConfig", dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False, eos_token_id=1,
    )),
    "tiny-qwen2": ("Qwen2Config", dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=4096, tie_word_embeddings=True, use_sliding_window=False,
        eos_token_id=1,
    )),
}

SHARD_BYTES = 2 * 2**30
MARKER = "tokenmill-random-weights.json"


def make_config(name: str):
    import transformers

    class_name, kwargs = SHAPES[name]
    kwargs = dict(kwargs)
    cls = getattr(transformers, class_name)
    if "rope_parameters" not in cls().to_dict():  # transformers 4.x names them rope_theta + rope_scaling
        rope = kwargs.pop("rope_parameters")
        kwargs["rope_theta"] = rope.pop("rope_theta")
        if rope.get("rope_type") != "default":
            kwargs["rope_scaling"] = rope
    return cls(**kwargs, dtype="bfloat16")


def _tensor_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every stored tensor, read off a model built on the meta device (no memory)."""
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    # named_parameters drops the tied lm_head.weight, as save_pretrained does.
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def _write_tokenizer(path: Path, vocab_size: int, eos_token_id: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Joins words with spaces. No WordPiece punctuation cleanup (there is no punctuation here): it would make each
    # decode ~4x slower than a real model's byte-level BPE decode, and the engine decodes every token.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": f"t{eos_token_id}", "pad_token": "t0",
        "bos_token": None, "unk_token": "t0",
    }))


def build_random_model(name: str, root: Path, device: str = "cuda", std: float = 0.02, seed: int = 0) -> Path:
    """Directory of a random-weight bf16 model of the named shape; reused if already built."""
    from safetensors.torch import save_file

    path = Path(root) / name
    if (path / MARKER).is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    config = make_config(name)
    config.save_pretrained(path)
    eos = config.eos_token_id if isinstance(config.eos_token_id, int) else config.eos_token_id[0]
    gen = torch.Generator(device=device).manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, weight_map, files = 0, {}, []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            fname = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(path / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
            files.append(fname)
            shard, shard_bytes = {}, 0

    total = 0
    for tensor_name, shape in _tensor_shapes(config):
        if tensor_name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16, device=device)
        else:
            t = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std).to(torch.bfloat16)
        nbytes = t.numel() * 2
        if shard_bytes + nbytes > SHARD_BYTES:
            flush()
        shard[tensor_name] = t.cpu()
        shard_bytes += nbytes
        total += nbytes
    flush()
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    _write_tokenizer(path, config.vocab_size, eos)
    (path / MARKER).write_text(json.dumps({"name": name, "bytes": total, "seconds": time.perf_counter() - start}))
    return path
