"""KV-cache sizing from a profiled forward: the formula, the dummy batch, the planner's prediction."""

from __future__ import annotations

import pytest
import torch

from tokenmill.worker.gpu_memory import (
    GiB,
    MemoryProfile,
    dummy_prefill_inputs,
    num_blocks_for_budget,
    planner_prediction,
    run_dummy_forward,
)

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


def test_num_blocks_formula():
    # 80 GiB x 0.9 = 72 GiB - 15 weights - 1 activations - 0.5 other = 55.5 GiB of 2 MiB blocks.
    blocks = num_blocks_for_budget(80 * GiB, 0.9, 15 * GiB, 1 * GiB, GiB // 2, 2 * 2**20)
    assert blocks == int(55.5 * 1024 / 2)


def test_num_blocks_error_names_the_fix():
    with pytest.raises(ValueError, match="raise gpu_memory_utilization"):
        num_blocks_for_budget(16 * GiB, 0.9, 15 * GiB, GiB, 0, 2**20)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        num_blocks_for_budget(16 * GiB, 1.5, 0, 0, 0, 2**20)


def test_dummy_inputs_split_tokens_over_sequences():
    ids, positions, meta = dummy_prefill_inputs(num_tokens=10, num_seqs=4, block_size=4, device="cpu")
    assert meta.seq_lens_list == [3, 3, 2, 2]
    assert meta.query_start_loc_list == [0, 3, 6, 8, 10]
    assert positions.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 0, 1]
    assert ids.shape == (10,) and meta.slot_mapping.tolist() == [0] * 10
    assert meta.block_tables.shape == (4, 1)
    _, _, one = dummy_prefill_inputs(num_tokens=3, num_seqs=8, block_size=4, device="cpu")
    assert one.decode_indices == [0, 1, 2] and one.decode_rows.tolist() == [0, 1, 2]


def test_dummy_forward_runs_on_cpu():
    from tokenmill.attention.torch_backend import TorchAttentionBackend
    from tokenmill.model.llama import LlamaForCausalLM
    from tokenmill.model.registry import DecoderSpec

    spec = DecoderSpec.from_hf_config({
        "model_type": "qwen2", "vocab_size": 50, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
        "max_position_embeddings": 256,
    })
    model = LlamaForCausalLM(spec, TorchAttentionBackend(4, 1, 8, 8**-0.5), 256)
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append((args[0].shape, out.shape)))
    probs = run_dummy_forward(model, spec.num_kv_heads, spec.head_dim, spec.num_layers, torch.float32,
                              torch.device("cpu"), max_num_batched_tokens=70, max_num_seqs=4, block_size=16)
    # One forward over the whole token budget, then the sampler's float32 softmax of one row per sequence.
    assert calls == [(torch.Size([70]), torch.Size([70, 32]))]
    assert probs.shape == (4, 50) and probs.dtype == torch.float32
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(dim=-1), torch.ones(4))


def test_planner_prediction_for_llama_8b():
    weights, activations, overhead = planner_prediction(LLAMA_8B, torch.bfloat16, 8192, 256, enforce_eager=False)
    assert 14.5 * GiB < weights < 15.5 * GiB  # 8.03e9 parameters in bf16
    assert 0.5 * GiB < activations < 2 * GiB
    assert overhead > 0
    assert planner_prediction({"model_type": "nonsense"}, torch.bfloat16, 8192, 256, False) is None


def test_profile_log_line_sets_measure_beside_prediction():
    profile = MemoryProfile(
        total_bytes=80 * GiB, gpu_memory_utilization=0.9, weights_bytes=15 * GiB, activation_peak_bytes=GiB,
        non_torch_bytes=GiB // 2, bytes_per_block=2 * 2**20, block_size=16, num_blocks=28416,
        max_num_batched_tokens=8192, planned_weights_bytes=15 * GiB, planned_activation_peak_bytes=GiB,
        planned_overhead_bytes=GiB, planned_num_blocks=28160,
    )
    line = profile.log_line()
    assert "28416 blocks" in line and "-> 28160 blocks" in line
    assert profile.as_dict()["kv_cache_bytes"] == 28416 * 2 * 2**20
