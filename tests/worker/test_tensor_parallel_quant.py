"""Quantized checkpoints split over tensor-parallel ranks (CPU, gloo over 127.0.0.1): AWQ, GPTQ (act-order and
not, symmetric and with zero points), compressed-tensors and FP8 checkpoints written by the test quantizer
(tests/quant_checkpoints.py) give TP=1's greedy tokens and prompt logprobs at TP=2, each rank holding its
columns' packs or its rows' groups; act-order layers split by rows keep every group's scales. A size that cuts
a quantization group or an output pack is refused with the layer, the group or pack, and the valid sizes."""

from __future__ import annotations

import pytest

from tests import quant_checkpoints as qc
from tests.worker.test_tensor_parallel import compare, make_core, make_prompts
from tokenmill.model.loader import read_hf_config
from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.worker import check_tensor_parallel_size

# format -> (tiny architecture, writer): the llama has 64 hidden / 128 MLP inputs (32 and 64 per rank at TP=2);
# the qwen2 adds q/k/v biases and tied embeddings.
WRITERS = {
    "awq": ("llama", lambda src, dst: qc.write_awq(src, dst, group_size=32)),
    "gptq-sym": ("llama", lambda src, dst: qc.write_gptq(src, dst, group_size=32)),
    "gptq-asym-8bit": ("llama", lambda src, dst: qc.write_gptq(src, dst, group_size=32, bits=8, sym=False)),
    "gptq-act-order-asym": ("qwen2", lambda src, dst: qc.write_gptq(src, dst, group_size=32, sym=False,
                                                                    desc_act=True)),
    "gptq-act-order-sym": ("llama", lambda src, dst: qc.write_gptq(src, dst, group_size=32, desc_act=True,
                                                                   seed=3)),
    "ct-w4a16": ("llama", lambda src, dst: qc.write_compressed_tensors(src, dst, bits=4, group_size=32, sym=False)),
    "ct-int8": ("llama", lambda src, dst: qc.write_compressed_tensors(src, dst, bits=8, group_size=None)),
    "fp8": ("llama", lambda src, dst: qc.write_fp8(src, dst)),
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
