"""Quantized checkpoints split over tensor-parallel ranks (CPU, gloo over 127.0.0.1): AWQ, GPTQ (act-order and
not, symmetric and with zero points), compressed-tensors and FP8 checkpoints written by the test quantizer
(tests/quant_checkpoints.py) give TP=1's greedy tokens and prompt logprobs at TP=2, each rank holding its
columns' packs or its rows' groups; act-order layers split by rows keep every group's scales. A size that cuts
a quantization group or an output pack is refused with the layer, the group or pack, and the valid sizes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests import quant_checkpoints as qc
from tests.worker.test_tensor_parallel import compare, make_core, make_prompts
from tokenmill.model.layers.linear import Linear, TensorParallelShard, check_tensor_parallel_split
from tokenmill.model.loader import read_hf_config
from tokenmill.model.quantization import resolve_quantization
from tokenmill.model.quantization.awq import AWQConfig
from tokenmill.model.quantization.gptq import GPTQConfig
from tokenmill.model.quantization.weight_only import regroup_by_index
from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.worker import check_tensor_parallel_size

# format -> (tiny architecture, writer): the llama has 64 hidden / 128 MLP inputs (32 and 64 per rank at TP=2);
# the qwen2 adds q/k/v biases and tied embeddings. (8-bit GPTQ, per-tensor fp8 and the other compressed-tensors
# variants are split at the layer level below, which needs no worker processes.)
WRITERS = {
    "awq": ("llama", lambda src, dst: qc.write_awq(src, dst, group_size=32)),
    "gptq-sym": ("llama", lambda src, dst: qc.write_gptq(src, dst, group_size=32)),
    "gptq-asym": ("llama", lambda src, dst: qc.write_gptq(src, dst, group_size=32, sym=False)),
    "gptq-act-order-asym": ("qwen2", lambda src, dst: qc.write_gptq(src, dst, group_size=32, sym=False,
                                                                    desc_act=True)),
    "gptq-act-order-sym": ("llama", lambda src, dst: qc.write_gptq(src, dst, group_size=32, desc_act=True,
                                                                   seed=3)),
    "ct-w4a16-actorder": ("llama", lambda src, dst: qc.write_compressed_tensors(src, dst, bits=4, group_size=32,
                                                                                actorder=True)),
    "ct-int8": ("llama", lambda src, dst: qc.write_compressed_tensors(src, dst, bits=8, group_size=None)),
    "fp8-per-channel": ("llama", lambda src, dst: qc.write_fp8(src, dst, per_channel=True)),
}


def written(fmt: str, tiny_models, root):
    arch, write = WRITERS[fmt]
    write(tiny_models[arch], root / fmt)
    return root / fmt


@pytest.mark.slow  # two engines (one with two worker processes) per format
@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_quantized_checkpoint_at_tp2_matches_tp1(fmt, tiny_models, tmp_path):
    model_dir = written(fmt, tiny_models, tmp_path)
    check_tensor_parallel_size(read_hf_config(model_dir), 2)
    reference = make_core(model_dir, 1)
    sharded = make_core(model_dir, 2)
    try:
        prompts = make_prompts(384, (5, 40, 20))
        params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=1)] * 3
        compare(reference, sharded, prompts, params, fmt)
    finally:
        sharded.shutdown()
        reference.shutdown()


def test_a_split_that_cuts_a_group_is_refused_with_the_valid_sizes(tiny_models, tmp_path):
    """AWQ groups of 64: o_proj's 64 inputs cannot go 32 to a rank. Refused before any worker process starts."""
    model_dir = tmp_path / "awq64"
    qc.write_awq(tiny_models["llama"], model_dir, group_size=64)
    message = (r"model\.layers\.0\.self_attn\.o_proj: its 64 inputs split over tensor_parallel_size=2 give 32 per "
               r"rank, which cuts through the 64-input blocks of its AWQLinearMethod weights \(group_size 64\): "
               r"sizes that split this layer are 1$")
    with pytest.raises(ValueError, match=message):
        check_tensor_parallel_size(read_hf_config(model_dir), 2)
    with pytest.raises(ValueError, match=message):
        make_core(model_dir, 2)


def test_act_order_splits_by_whole_packs_not_groups():
    """GPTQ act-order keeps every group's scales on each rank, so its rows split by packs of 8 inputs (not by
    groups of 32): 128 MLP inputs over 8 ranks (16 each) are fine for the down_proj, and 4 per rank are not;
    without act-order the same 16 per rank cut its groups."""
    method = GPTQConfig(4, 32, desc_act=True).get_linear_method("model.layers.0.mlp.down_proj")
    check_tensor_parallel_split(method, TensorParallelShard("row", ((0, 16),), 8, 128), 16,
                                "model.layers.0.mlp.down_proj")
    with pytest.raises(ValueError, match=r"down_proj: its 128 inputs split over tensor_parallel_size=32 give 4 per "
                                         r"rank, which cuts through the 8-input blocks .*\(packs of 8 inputs\)"):
        check_tensor_parallel_split(method, TensorParallelShard("row", ((0, 4),), 32, 128), 4,
                                    "model.layers.0.mlp.down_proj")
    no_act_order = GPTQConfig(4, 32).get_linear_method("model.layers.0.mlp.down_proj")
    with pytest.raises(ValueError, match=r"cuts through the 32-input blocks .*\(group_size 32\)"):
        check_tensor_parallel_split(no_act_order, TensorParallelShard("row", ((0, 16),), 8, 128), 16,
                                    "model.layers.0.mlp.down_proj")


def test_a_split_that_cuts_an_output_pack_is_refused_with_the_valid_sizes():
    """AWQ packs 8 outputs per int32: a rank holding 12 of a projection's 24 outputs would cut a word."""
    method = AWQConfig(32).get_linear_method("model.layers.0.mlp.gate_up_proj", ["model.layers.0.mlp.up_proj"])
    shard = TensorParallelShard("column", ((0, 12),), 2, 64)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj: its 24 outputs split over "
                                         r"tensor_parallel_size=2 give 12 per rank, which cuts through the packs of "
                                         r"8 outputs per int32 .* sizes that split this layer are 1, 3$"):
        Linear(64, 12, quant_method=method, prefix="model.layers.0.mlp.gate_up_proj", tp_shard=shard)


def test_act_order_rows_regrouped_for_the_kernels():
    """A rank's act-order channels (a few from every group) become whole kernel groups: each group's run padded
    with zero-weight columns; the weight they encode, gathered back by perm, is the slice's exactly."""
    g = torch.Generator().manual_seed(0)
    n, k, groups = 8, 40, 4
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scales = torch.rand(n, groups, generator=g) + 0.5
    zeros = torch.randint(0, 16, (n, groups), generator=g, dtype=torch.uint8)
    g_idx = torch.randint(0, groups, (k,), generator=g).to(torch.int32)
    g_idx[:4] = torch.tensor([3, 0, 3, 1], dtype=torch.int32)  # group 2 absent: nothing of it is kept
    expected = (q.float() - zeros[:, g_idx.long()].float()) * scales[:, g_idx.long()]
    c = regroup_by_index(q, scales, zeros, g_idx, 4, unit=32)
    assert c.group_size == 32 and c.q.shape[1] % 32 == 0 and c.q.shape[1] <= 32 * groups
    dense = (c.q.float() - c.zeros.repeat_interleave(32, dim=1).float()) * c.scales.repeat_interleave(32, dim=1)
    x = torch.randn(3, k, generator=g)
    torch.testing.assert_close(x[:, c.perm] @ dense.T, x @ expected.T, rtol=1e-5, atol=1e-5)


# Layer-level splits, in one process: each rank's part of layer 0's q/k/v (column) and down_proj (row) loaded
# from the checkpoint, on the CPU kernels and on the Triton GEMM (TRITON_INTERPRET=1); the ranks' outputs,
# concatenated or summed (the all-reduce), are the whole layer's.
LAYER_FORMATS = {
    "awq": lambda src, dst: qc.write_awq(src, dst, group_size=32),
    "gptq-asym": lambda src, dst: qc.write_gptq(src, dst, group_size=32, sym=False),
    "gptq-act-order-asym": lambda src, dst: qc.write_gptq(src, dst, group_size=32, sym=False, desc_act=True),
    "gptq-8bit": lambda src, dst: qc.write_gptq(src, dst, group_size=32, bits=8),
    "gptq-8bit-act-order": lambda src, dst: qc.write_gptq(src, dst, group_size=64, bits=8, desc_act=True),
    "ct-w4a16-asym": lambda src, dst: qc.write_compressed_tensors(src, dst, bits=4, group_size=32, sym=False),
    "ct-w8a16": lambda src, dst: qc.write_compressed_tensors(src, dst, bits=8, group_size=None),
    "ct-w4a16-actorder-asym": lambda src, dst: qc.write_compressed_tensors(src, dst, bits=4, group_size=32,
                                                                           sym=False, actorder=True),
    "fp8": lambda src, dst: qc.write_fp8(src, dst),
    "fp8-channel": lambda src, dst: qc.write_fp8(src, dst, per_channel=True),
}
QKV_SIZES = (64, 32, 32)  # the tiny llama's q, k, v rows


@pytest.fixture(scope="module")
def layer_checkpoints(llama_dir, tmp_path_factory) -> dict[str, tuple[dict, dict, dict]]:
    """format -> (quantization_config, checkpoint tensors, reference weights)."""
    root = tmp_path_factory.mktemp("tp_quant_layers")
    out = {}
    for name, write in LAYER_FORMATS.items():
        reference = write(llama_dir, root / name)
        config = read_hf_config(root / name)
        out[name] = (config, load_file(str(root / name / "model.safetensors")), reference)
    return out


def rank_layer(config: dict, tensors: dict, prefix: str, parts: list[str], in_features: int, sizes: list[int],
               shard: TensorParallelShard, backend: str | None) -> Linear:
    method = resolve_quantization(config, None).get_linear_method(prefix, parts)
    if backend is not None:
        method.backend = backend
    layer = Linear(in_features, sum(sizes), quant_method=method, output_sizes=sizes, dtype=torch.float32,
                   prefix=prefix, tp_shard=shard)
    for name, tensor in tensors.items():
        for shard_id, part in enumerate(parts):
            if name.startswith(part + "."):
                layer.load_weight(name.removeprefix(part + "."), tensor, shard_id if len(parts) > 1 else None)
    layer.process_weights_after_loading()
    return layer


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("fmt", list(LAYER_FORMATS))
def test_rank_parts_of_a_layer_add_up_to_the_layer(fmt, backend, layer_checkpoints):
    if backend == "triton":
        if fmt.startswith("fp8"):
            pytest.skip("fp8 runs on torch._scaled_mm on Hopper GPUs, dequantized elsewhere (the cpu case)")
        pytest.importorskip("triton")
    config, tensors, reference = layer_checkpoints[fmt]
    tp, x = 2, torch.randn(3, 128, generator=torch.Generator().manual_seed(2))
    attn, mlp = "model.layers.0.self_attn", "model.layers.0.mlp"
    parts = [f"{attn}.{p}_proj" for p in "qkv"]
    qkv = []
    for rank in range(tp):
        ranges = tuple((rank * n // tp, n // tp) for n in QKV_SIZES)
        layer = rank_layer(config, tensors, f"{attn}.qkv_proj", parts, 64, [n // tp for n in QKV_SIZES],
                           TensorParallelShard("column", ranges, tp, 64), backend)
        qkv.append(layer.quant_method.apply(layer, x[:, :64]).split([n // tp for n in QKV_SIZES], dim=-1))
    got = torch.cat([qkv[r][i] for i in range(3) for r in range(tp)], dim=-1)
    expected = x[:, :64] @ torch.cat([reference[f"{p}.weight"] for p in parts]).T
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())

    down = f"{mlp}.down_proj"
    partial = []
    for rank in range(tp):
        layer = rank_layer(config, tensors, down, [down], 64, [64],
                           TensorParallelShard("row", ((rank * 64, 64),), tp, 128), backend)
        partial.append(layer.quant_method.apply(layer, x[:, rank * 64:(rank + 1) * 64]))
    expected = x @ reference[f"{down}.weight"].T
    torch.testing.assert_close(sum(partial), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
