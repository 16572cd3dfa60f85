"""Builders for tiny random-weight models and a small trained BPE tokenizer, used across the tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention stores keys and values in fixed-size blocks.",
    "Continuous batching lets new requests join a running batch at every step.",
    "Prefix caching reuses the blocks of a shared system prompt across many users.",
    "Le café est très bon. Größe, naïve façade, 東京タワー, 世界 🙂 emoji ünïcödé",
    "def main():\n    print('hello world')\n    return 42\n",
    "1234567890 + 987654321 = ?",
]

TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def build_tokenizer(path: Path, vocab_size: int = 384) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
    }))


def build_sentencepiece_tokenizer(path: Path, vocab_size: int = 384) -> None:
    """A SentencePiece-style BPE tokenizer, as Llama 2 / Mistral ship it in tokenizer.json: "▁" for spaces
    (Metaspace), <0x00>..<0xFF> byte-fallback tokens for characters outside the vocabulary, and a decoder
    that strips the leading space. Same special tokens and chat template as build_tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = metaspace
    trained.train_from_iterator(_CORPUS * 20, trainers.BpeTrainer(vocab_size=vocab_size - 257, show_progress=False))
    model = json.loads(trained.to_str())["model"]
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    for token in sorted(model["vocab"], key=model["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1),
    ])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<unk>",
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
    }))


def _config(name: str, vocab_size: int, eos_id: int, pad_id: int, **overrides):
    import transformers

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=eos_id, bos_token_id=None, pad_token_id=pad_id, rms_norm_eps=1e-6,
        initializer_range=0.1,
    )
    common.update(overrides)
    if name == "llama":
        # Llama 3.1 RoPE scaling with a short original context, so the scaled band is exercised.
        return transformers.LlamaConfig(
            **common, tie_word_embeddings=False, rope_theta=10000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        )
    if name == "mistral":
        return transformers.MistralConfig(**common, tie_word_embeddings=False, sliding_window=48, head_dim=16)
    if name == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True, use_sliding_window=False)
    if name == "qwen3":
        # head_dim differs from hidden_size / num_attention_heads, as in real Qwen3 models.
        return transformers.Qwen3Config(**common, tie_word_embeddings=False, head_dim=32)
    raise ValueError(name)


def build_tiny_model(name: str, path: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random-weight model of architecture `name`; overrides replace config fields (num_attention_heads,
    vocab_size, ...)."""
    import transformers

    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab_size = len(tok["model"]["vocab"]) + sum(
        1 for t in tok["added_tokens"] if t["content"] not in tok["model"]["vocab"]
    )
    vocab = {t["content"]: t["id"] for t in tok["added_tokens"]}
    config = _config(name, overrides.pop("vocab_size", vocab_size), vocab["<|im_end|>"], vocab["<|endoftext|>"],
                     **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.generation_config.eos_token_id = vocab["<|im_end|>"]
    model.save_pretrained(path, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path
