"""benchmarks/peers/run.py's pure parts: parameter counts, roofline and output agreement (the engines are not
run)."""

from __future__ import annotations

import json

import pytest

from benchmarks.peers.run import agreement_with, decode_roofline, model_shape, roofline_tok_per_s

SMOLLM2_CONFIG = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}


@pytest.fixture
def shape(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
    return model_shape(tmp_path)


def test_parameter_count_matches_smollm2(shape):
    assert shape["p_total"] == 134_515_008  # the published parameter count of SmolLM2-135M
    assert shape["p_head"] == 49152 * 576 and shape["d_q"] == 576 and shape["d_kv"] == 192


def test_roofline_is_memory_bound_alone_and_compute_bound_batched(shape):
    requests = [{"prompt_token_ids": [1] * 32, "output_len": 64}] * 64
    weights = (shape["p_body"] + shape["p_head"]) * 2.0
    flops, bandwidth = 1e11, 1e10  # ridge point 10 FLOP/byte: bf16 decode does C FLOP per weight byte
    alone = roofline_tok_per_s(requests[:1], 1, shape, weights, 2.0, flops, bandwidth)
    assert alone["bound"] == "memory"
    # One request: every output token reads all weights once, plus a little KV cache.
    assert alone["tok_per_s"] == pytest.approx(bandwidth / weights, rel=0.02)
    batched = roofline_tok_per_s(requests, 64, shape, weights, 2.0, flops, bandwidth)
    assert batched["bound"] == "compute" and batched["tok_per_s"] > 5 * alone["tok_per_s"]
    decode = decode_roofline(requests[:1], shape, weights, 2.0, flops, bandwidth)
    assert decode == pytest.approx(bandwidth / weights, rel=0.02)


def test_agreement_with_reference():
    reference = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    result = agreement_with(reference, [[1, 2, 0], [4, 5, 6], [0, 8, 9]])
    assert result["first_token_agreement"] == pytest.approx(2 / 3)
    assert result["mean_common_prefix"] == pytest.approx((2 + 3 + 0) / 3)
