"""Tensor-parallel collectives per decode step and the pipeline stage split (tokenmill/planner/parallel.py), and
the per-stage memory they rest on (weight_bytes / KV bytes / memory_breakdown with pipeline_parallel_size)."""

import pytest

from tokenmill.planner import (
    ServingConfig,
    get_gpu,
    kv_cache_bytes_per_sequence,
    load_arch,
    max_concurrency,
    memory_breakdown,
    plan,
    weight_bytes,
)
from tokenmill.planner.fit import stage_memory_breakdowns
from tokenmill.planner.parallel import pipeline_plan, tp_communication

LLAMA_8B = load_arch("Llama-3.1-8B")  # 32 layers, hidden 4096, 32 q / 8 kv heads of 128, MLP 14336, vocab 128256
H, V, LAYERS, INTER = 4096, 128256, 32, 14336


@pytest.mark.parametrize(
    "tp, tokens, sent",
    [
        # 65 all-reduces of tokens x 4096 x 2 bytes, each 2 (N-1)/N on a ring, + (N-1)/N of tokens x 128256 x 2
        (2, 1, 65 * 8192 * 1 + 256512 // 2),
        (4, 1, 65 * 8192 * 3 // 2 + 256512 * 3 // 4),
        (8, 1, 65 * 8192 * 7 // 4 + 256512 * 7 // 8),
        (8, 16, 16 * (65 * 8192 * 7 // 4 + 256512 * 7 // 8)),
    ],
)
def test_tp_communication_bytes_llama_8b(tp, tokens, sent):
    c = tp_communication(LLAMA_8B, tp, tokens)
    assert c.dtype == "bfloat16"
    assert c.num_all_reduces == 2 * LAYERS + 1
    assert c.all_reduce_bytes == tokens * H * 2
    assert c.all_gather_bytes == tokens * V * 2
    assert c.payload_bytes == 65 * tokens * H * 2 + tokens * V * 2
    assert c.bytes_sent_per_gpu == sent
    assert c.time_s is None and c.dominates is None  # no device given: bytes only


def test_tp_communication_time_on_nvlink_beside_the_memory_time():
    h100 = get_gpu("H100")
    c = tp_communication(LLAMA_8B, 8, 1, h100, context_len=0)
    assert (c.interconnect, c.interconnect_gbps) == ("NVLink 4", 450)
    assert c.bandwidth_time_s == pytest.approx((65 * 8192 * 7 / 4 + 256512 * 7 / 8) / 450e9)
    assert c.latency_time_s == pytest.approx(66 * 8e-6)  # 65 all-reduces + the all-gather
    # The memory time: one rank's eighth of the weights read once (the embedding table is only gathered).
    per_rank = weight_bytes(LLAMA_8B, "auto", 8).total - V * H * 2 // 8
    assert c.memory_time_s == pytest.approx(per_rank / 3350e9, rel=1e-6)
    # At tp=8 and batch 1 the collectives' fixed latency is close to the whole weight read; with a growing batch
    # the logits and activations outgrow the KV-free memory time from some batch on.
    first, last = c.dominates_batches
    assert last is None
    assert not tp_communication(LLAMA_8B, 8, first - 1, h100).dominates
    assert tp_communication(LLAMA_8B, 8, first, h100).dominates


def test_tp_communication_pcie_costs_more_than_nvlink():
    nv = tp_communication(LLAMA_8B, 4, 64, get_gpu("H100"), 2048)
    pcie = tp_communication(LLAMA_8B, 4, 64, get_gpu("H100-PCIe"), 2048)
    assert pcie.bandwidth_time_s == pytest.approx(nv.bandwidth_time_s * 450 / 64)
    assert pcie.ratio_to_memory_time > nv.ratio_to_memory_time


def test_tp_communication_without_interconnect_and_errors():
    c = tp_communication(LLAMA_8B, 2, 4, get_gpu("CPU"))
    assert c.bytes_sent_per_gpu > 0 and c.time_s is None and c.memory_time_s is None
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide.*use one of 1, 2, 4, 8"):
        tp_communication(LLAMA_8B, 3, 1)
    with pytest.raises(ValueError, match="num_tokens must be a positive integer"):
        tp_communication(LLAMA_8B, 2, 0)


def test_pipeline_plan_llama_8b_two_stages():
    p = pipeline_plan(LLAMA_8B, 2, precision="bf16", decode_tokens=16, prefill_tokens=8192)
    attention = (H * H + 2 * 1024 * H + H * H) * 2  # q, k, v, o per layer, bf16
    mlp = 3 * INTER * H * 2
    norms = 2 * H * 2
    layer = attention + mlp + norms
    assert [s.layers for s in p.stages] == [(0, 16), (16, 32)]
    assert [(s.has_embedding, s.has_lm_head) for s in p.stages] == [(True, False), (False, True)]
    assert p.stages[0].weight_bytes == V * H * 2 + 16 * layer == 8_030_257_152
    assert p.stages[1].weight_bytes == 16 * layer + H * 2 + V * H * 2 == 8_030_265_344  # final norm + lm_head
    assert [s.kv_bytes_per_token for s in p.stages] == [16 * 2 * 8 * 128 * 2] * 2
    assert p.largest_stage == 1
    assert p.activation_bytes_per_token == 2 * H * 2  # hidden states + residual
    assert p.decode_bytes_per_boundary == 16 * 2 * H * 2
    assert p.prefill_bytes_per_boundary == 8192 * 2 * H * 2


def test_pipeline_plan_with_tensor_parallelism():
    p = pipeline_plan(LLAMA_8B, 2, 2, precision="bf16")
    attention = (H * H + 2 * 1024 * H + H * H) * 2
    mlp = 3 * INTER * H * 2
    assert p.stages[0].weight_bytes == V * H * 2 // 2 + 16 * (attention + mlp) // 2 + 16 * 2 * H * 2
    assert p.stages[0].kv_bytes_per_token == 16 * 2 * 4 * 128 * 2  # 4 of the 8 KV heads per rank


def test_stages_add_up_to_the_model_and_uneven_splits():
    arch = load_arch("Llama-3.1-70B")  # 80 layers: 3 stages of 27, 27, 26
    whole = weight_bytes(arch, "bf16").total
    stages = [weight_bytes(arch, "bf16", 1, None, 3, s) for s in range(3)]
    assert sum(s.total for s in stages) == whole
    assert [pipeline_plan(arch, 3, precision="bf16").stages[i].layers for i in range(3)] == [(0, 27), (27, 54),
                                                                                              (54, 80)]
    kv = [kv_cache_bytes_per_sequence(arch, 1000, "bf16", 1, 16, 3, s) for s in range(3)]
    assert sum(kv) == kv_cache_bytes_per_sequence(arch, 1000, "bf16", 1, 16)
    assert kv[0] == kv[1] == kv[2] // 26 * 27


def test_tied_embedding_is_copied_to_the_last_stage():
    arch = load_arch("Llama-3.2-1B")
    assert arch.tie_word_embeddings
    table = arch.vocab_size * arch.hidden_size * 2
    first = weight_bytes(arch, "bf16", 1, None, 2, 0)
    last = weight_bytes(arch, "bf16", 1, None, 2, 1)
    assert first.by_component["embedding"] == table and "lm_head" not in first.by_component
    assert last.by_component["lm_head"] == table and "embedding" not in last.by_component
    assert first.total + last.total == weight_bytes(arch, "bf16").total + table


def test_pipeline_stages_decide_fit_and_concurrency():
    arch, h100 = load_arch("Llama-3.1-70B"), get_gpu("H100")
    serving = ServingConfig(precision="bf16")
    assert max_concurrency(arch, h100, 4096, serving, 1, 1) == 0  # 141 GB of weights on one 80 GB GPU
    stages = stage_memory_breakdowns(arch, h100, 4096, 1, serving, 1, 4)
    assert [m.stage_layers for m in stages] == [(0, 20), (20, 40), (40, 60), (60, 80)]
    expected = min(m.kv_cache_budget // m.kv_cache for m in stages)
    assert max_concurrency(arch, h100, 4096, serving, 1, 4) == expected > 0
    largest = memory_breakdown(arch, h100, 4096, 8, serving, 1, 4)
    assert largest.total == max(m.total for m in stage_memory_breakdowns(arch, h100, 4096, 8, serving, 1, 4))
    assert largest.pipeline_stage == 3  # the lm_head and the logits
    result = plan(arch, ["H100"], serving=serving, tensor_parallel_size=1, pipeline_parallel_size=4)
    g = result.gpus[0]
    assert g.status == "fits" and g.num_gpus == 4 and g.pipeline is not None and g.tp_communication is None
    assert plan(arch, ["H100"], serving=serving, tensor_parallel_size=1).gpus[0].status == "no"


def test_pipeline_errors():
    with pytest.raises(ValueError, match="pipeline_parallel_size=33 exceeds the model's 32 layers.*at most 32"):
        pipeline_plan(LLAMA_8B, 33)
    with pytest.raises(ValueError, match="pipeline_parallel_size must be a positive integer"):
        plan(LLAMA_8B, ["H100"], pipeline_parallel_size=0)
    with pytest.raises(ValueError, match="pipeline_stage must be in 0..1"):
        weight_bytes(LLAMA_8B, "bf16", 1, None, 2, 2)


def test_decode_with_pipeline_stages_reads_each_stage_per_microbatch():
    from tokenmill.planner import decode_estimate

    h100 = get_gpu("H100")
    one = decode_estimate(LLAMA_8B, h100, 2, 0, "bf16")
    two = decode_estimate(LLAMA_8B, h100, 2, 0, "bf16", pipeline_parallel_size=2)
    # Microbatches of one sequence; the last stage (16 layers, final norm, lm_head) is the slower one, and a
    # sequence's next token comes back after one tick on each stage.
    assert two.weight_bytes_read == 8_030_265_344
    assert two.step_time_s == pytest.approx(2 * 8_030_265_344 / (3350e9 * 0.75))
    assert two.tokens_per_s == pytest.approx(2 / two.step_time_s)
    # Memory-bound with no KV: at best the throughput of one GPU, spread over two; here less, because the slower
    # stage sets the pace (one GPU reads every weight but the gathered embedding table once per step).
    one_read = 16_060_522_496 - V * H * 2
    assert one.weight_bytes_read == one_read
    assert two.tokens_per_s / one.tokens_per_s == pytest.approx(one_read / (2 * 8_030_265_344))
    assert two.num_gpus == 2 and two.tokens_per_s_per_gpu == pytest.approx(two.tokens_per_s / 2)


def test_catalog_file_sets_the_interconnect(tmp_path):
    from tokenmill.planner import load_gpu_catalog

    path = tmp_path / "gpus.json"
    path.write_text('{"B200": {"memory_gib": 179, "bandwidth_gbps": 8000, "bf16_tflops": 2250, '
                    '"interconnect": "NVLink 5", "interconnect_gbps": 900, "collective_latency_us": 4}}')
    b200 = get_gpu("B200", load_gpu_catalog(path))
    c = tp_communication(LLAMA_8B, 2, 1, b200)
    assert c.bandwidth_time_s == pytest.approx(660736 / 900e9)
    assert c.latency_time_s == pytest.approx(66 * 4e-6)
    path.write_text('{"H100": {"interconnect_gbps": 0}}')
    with pytest.raises(ValueError, match="interconnect_gbps must be > 0"):
        load_gpu_catalog(path)
