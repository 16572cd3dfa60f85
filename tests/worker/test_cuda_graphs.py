"""The CUDA-graph runner's CPU-side logic: capture sizes, padding, persistent buffers, and the padded buffer
path through a tiny model on the Triton backend (interpreter), which must match the unpadded eager forward."""

from __future__ import annotations

import pytest
import torch

from tests.attention.triton.attention_cases import build_metadata
from tokenmill.worker.cuda_graphs import (
    CUDAGraphRunner,
    DecodeInputBuffers,
    capture_sizes,
    is_decode_only,
    padded_batch_size,
)

BLOCK_SIZE = 16
TINY_LLAMA = {
    "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
}


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 24, 32, 40]
    assert capture_sizes(45) == [1, 2, 4, 8, 16, 24, 32, 40, 45]
    sizes = capture_sizes(300)
    assert sizes[:6] == [1, 2, 4, 8, 16, 24]
    assert sizes[-4:] == [256, 272, 288, 300]
    assert len(capture_sizes(256)) == 4 + 31  # 1, 2, 4, 8 and 16..256 by 8
    with pytest.raises(ValueError):
        capture_sizes(0)


def test_padded_batch_size():
    sizes = capture_sizes(64)
    assert [padded_batch_size(n, sizes) for n in (1, 3, 5, 8, 9, 17, 64)] == [1, 4, 8, 8, 16, 24, 64]
    assert padded_batch_size(65, sizes) is None


def test_buffers_fill_and_pad():
    bufs = DecodeInputBuffers.allocate(max_batch=8, max_blocks_per_seq=4, device="cpu")
    bufs.slot_mapping.fill_(123)  # stale values from an earlier, larger step
    bufs.seq_lens.fill_(99)
    meta = build_metadata([(20, 1), (3, 1), (40, 1)], [[5, 2], [7], [0, 1, 3]], BLOCK_SIZE)
    ids = torch.tensor([11, 12, 13])
    positions = torch.tensor([20, 3, 40])
    bufs.fill(ids, positions, meta, padded=4)
    assert bufs.input_ids[:4].tolist() == [11, 12, 13, 0]
    assert bufs.positions[:4].tolist() == [20, 3, 40, 0]
    assert bufs.slot_mapping[:4].tolist() == [2 * 16 + 4, 7 * 16 + 3, 3 * 16 + 8, -1]
    assert bufs.seq_lens[:4].tolist() == [21, 4, 41, 0]
    assert bufs.block_tables[:3, :3].tolist() == [[5, 2, 0], [7, 0, 0], [0, 1, 3]]
    assert bufs.seq_lens[4:].tolist() == [99] * 4  # rows past the padded size are not touched

    captured = bufs.metadata(4, max_model_len=64)
    assert is_decode_only(captured)
    assert captured.decode_rows.tolist() == [0, 1, 2, 3]
    assert captured.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert captured.max_decode_seq_len == 64
    # The metadata holds views: a later fill is seen by the captured graph.
    bufs.fill(ids[:1], positions[:1], build_metadata([(9, 1)], [[6]], BLOCK_SIZE), padded=4)
    assert captured.decode_seq_lens.tolist() == [10, 0, 0, 0]


def test_fill_rejects_oversized_batches():
    bufs = DecodeInputBuffers.allocate(max_batch=2, max_blocks_per_seq=1, device="cpu")
    meta = build_metadata([(20, 1)], [[0, 1]], BLOCK_SIZE)
    with pytest.raises(ValueError, match="max_model_len"):
        bufs.fill(torch.tensor([1]), torch.tensor([20]), meta, padded=1)
    with pytest.raises(ValueError, match="cannot pad"):
        bufs.fill(torch.tensor([1]), torch.tensor([20]), meta, padded=3)


def test_prefill_steps_are_not_decode_only():
    assert not is_decode_only(build_metadata([(0, 5), (3, 1)], [[0], [1]], BLOCK_SIZE))
    assert is_decode_only(build_metadata([(4, 1), (3, 1)], [[0], [1]], BLOCK_SIZE))


def test_rejects_torch_backend():
    from tokenmill.attention.torch_backend import TorchAttentionBackend
    from tokenmill.model.llama import LlamaForCausalLM
    from tokenmill.model.registry import DecoderSpec

    spec = DecoderSpec.from_hf_config(TINY_LLAMA)
    model = LlamaForCausalLM(spec, TorchAttentionBackend(4, 2, 8, 8**-0.5), 128)
    with pytest.raises(ValueError, match="enforce_eager"):
        CUDAGraphRunner(model, [], 4, 128, BLOCK_SIZE, "cpu", use_graphs=False)


def test_padded_buffer_path_matches_eager_forward():
    pytest.importorskip("triton", reason="triton is not installed: `pip install triton` runs the kernels on CPU")
    from tokenmill.attention.triton_backend import TritonAttentionBackend
    from tokenmill.model.llama import LlamaForCausalLM
    from tokenmill.model.registry import DecoderSpec

    torch.manual_seed(0)
    spec = DecoderSpec.from_hf_config(TINY_LLAMA)
    backend = TritonAttentionBackend(spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.head_dim**-0.5)
    model = LlamaForCausalLM(spec, backend, spec.max_position_embeddings).eval()
    num_blocks = 8
    kv_shape = (2, num_blocks, BLOCK_SIZE, spec.num_kv_heads, spec.head_dim)
    kv_caches = [torch.randn(kv_shape) for _ in range(spec.num_layers)]
    seqs, tables = [(20, 1), (3, 1), (33, 1)], [[5, 2], [7], [0, 1, 3]]
    meta = build_metadata(seqs, tables, BLOCK_SIZE)
    ids = torch.tensor([5, 9, 17])
    positions = torch.tensor([c for c, _ in seqs])

    with torch.inference_mode():
        before = [c.clone() for c in kv_caches]
        eager_caches = [c.clone() for c in kv_caches]
        expected = model(ids, positions, eager_caches, meta)
        runner = CUDAGraphRunner(model, kv_caches, max_num_seqs=8, max_model_len=64, block_size=BLOCK_SIZE,
                                 device="cpu", use_graphs=False)
        out = runner(ids, positions, kv_caches, meta)  # padded to 4 rows
    assert runner.num_replays == 1
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    # The padding row wrote nothing: every slot outside the real rows' is untouched, and the real rows' K/V
    # equal the eager run's (up to the matmul's rounding, which may depend on the row count on some CPUs).
    written = torch.zeros(num_blocks * BLOCK_SIZE, dtype=torch.bool)
    written[meta.slot_mapping] = True
    written = written.view(num_blocks, BLOCK_SIZE)
    for a, b, orig in zip(kv_caches, eager_caches, before):
        assert torch.equal(a[:, ~written], orig[:, ~written])
        torch.testing.assert_close(a[:, written], b[:, written], rtol=1e-4, atol=1e-5)
