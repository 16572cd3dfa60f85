"""Pipeline parallelism (--pipeline-parallel-size): the decoder layers split over stages in spawned worker
processes joined by gloo on 127.0.0.1, activations sent from stage to stage in microbatches, the last stage
sampling. The results must be one stage's: same greedy and seeded tokens, prompt logprobs within 1e-4, under
chunked prefill and preemption; each stage holds only its layers' weights and KV cache."""

from __future__ import annotations

import pytest
import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.engine_core import EngineCore
from tokenmill.model.loader import read_hf_config
from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured_output.params import StructuredOutputsParams
from tokenmill.worker.executor import WorkerProcessError
from tokenmill.worker.model_runner import split_microbatches

MAX_TOKENS = 10


def make_core(model_dir, **kwargs) -> EngineCore:
    # 10 blocks of 16 tokens on every rank: not all requests fit together (preemption); a budget of 24 tokens
    # chunks the long prompts beside the decodes.
    config = EngineConfig.from_kwargs(str(model_dir), dtype="float32", device="cpu", max_num_batched_tokens=24,
                                      max_model_len=128, num_gpu_blocks_override=10, **kwargs)
    return EngineCore(config, model_dir, show_progress=False)


def make_requests(vocab_size: int) -> list[tuple[list[int], SamplingParams]]:
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in (5, 70, 33, 90, 8, 51)]
    params = [SamplingParams(temperature=0, max_tokens=MAX_TOKENS) for _ in prompts]
    params[1] = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, prompt_logprobs=2, logprobs=2)
    params[2] = SamplingParams(temperature=1.0, seed=3, max_tokens=MAX_TOKENS)
    params[4] = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, min_tokens=4, presence_penalty=1.0)
    # A grammar: only the last stage compiles it and masks the logits.
    params[5] = SamplingParams(temperature=1.0, seed=5, max_tokens=MAX_TOKENS,
                               structured_outputs=StructuredOutputsParams(choice=["yes", "no", "maybe"]))
    return list(zip(prompts, params, strict=True))


def run(core: EngineCore, requests) -> tuple[dict[str, list[int]], dict[str, list[float]]]:
    """(request id -> output tokens, request id -> the logprob of each prompt token, for those that ask)."""
    from tokenmill.model.tokenizer import Tokenizer

    eos = frozenset(Tokenizer.from_pretrained(core.model_dir).eos_token_ids)
    tokens: dict[str, list[int]] = {}
    prompt_logprobs: dict[str, list[float]] = {}
    for i, (prompt, params) in enumerate(requests):
        core.add_request(Request(f"r{i}", prompt, params, eos))
        tokens[f"r{i}"] = []
    while core.has_unfinished_requests():
        for out in core.step():
            tokens[out.request_id] += out.new_token_ids
            if out.new_prompt_logprobs:
                prompt = requests[int(out.request_id[1:])][0]
                start = len(prompt_logprobs.setdefault(out.request_id, []))
                for position, target in zip(out.new_prompt_logprobs, prompt[start + 1 :], strict=False):
                    prompt_logprobs[out.request_id].append(position[target].logprob)
    return tokens, prompt_logprobs


def assert_same_results(got, expected) -> None:
    (tokens, prompt_logprobs), (expected_tokens, expected_logprobs) = got, expected
    assert tokens == expected_tokens
    assert prompt_logprobs.keys() == expected_logprobs.keys() == {"r1"}
    assert len(prompt_logprobs["r1"]) == len(expected_logprobs["r1"]) > 60
    torch.testing.assert_close(torch.tensor(prompt_logprobs["r1"]), torch.tensor(expected_logprobs["r1"]),
                               atol=1e-4, rtol=0)


def test_microbatches_are_contiguous_and_balanced_by_tokens():
    assert split_microbatches([1] * 5, 2) == [(0, 2), (2, 5)]
    assert split_microbatches([1] * 6, 3) == [(0, 2), (2, 4), (4, 6)]
    # A long prefill chunk is one microbatch; the decodes beside it the other.
    assert split_microbatches([20, 1, 1, 1, 1], 2) == [(0, 1), (1, 5)]
    assert split_microbatches([1, 1, 1, 1, 20], 2) == [(0, 4), (4, 5)]
    assert split_microbatches([6, 6, 6, 6], 2) == [(0, 2), (2, 4)]
    # Never an empty microbatch: fewer requests than stages give fewer microbatches.
    assert split_microbatches([7], 2) == [(0, 1)]
    assert split_microbatches([1, 9], 4) == [(0, 1), (1, 2)]
    assert split_microbatches([30, 1, 1], 3) == [(0, 1), (1, 2), (2, 3)]


def test_more_stages_than_layers_is_refused_before_any_process_starts(llama_dir):
    num_layers = read_hf_config(llama_dir)["num_hidden_layers"]
    with pytest.raises(ValueError, match=f"pipeline_parallel_size=3 exceeds the {num_layers} decoder layers.*"
                                         f"use 1 to {num_layers}"):
        make_core(llama_dir, pipeline_parallel_size=3)


@pytest.mark.slow  # two spawned worker processes per case (~10 s)
@pytest.mark.parametrize("arch,async_scheduling", [("llama", True), ("mistral", False), ("qwen2", True),
                                                   ("qwen3", False)])
def test_two_stages_give_one_stage_results(tiny_models, arch, async_scheduling):
    model_dir = tiny_models[arch]
    requests = make_requests(read_hf_config(model_dir)["vocab_size"])
    local = make_core(model_dir, async_scheduling=async_scheduling)
    expected = run(local, requests)
    assert local.scheduler.num_preemptions > 0, "10 KV blocks were meant to force preemption"
    one_stage = local.engine_info()
    piped = make_core(model_dir, pipeline_parallel_size=2, async_scheduling=async_scheduling)
    try:
        assert piped.kv_sizing.num_blocks == 10
        assert_same_results(run(piped, requests), expected)
        assert piped.scheduler.num_preemptions > 0
        info = piped.engine_info()
        ranks = info["ranks"]
        # Each stage holds its layer and its KV cache only: the split of the planner, half the KV bytes each.
        assert [r["layers"] for r in ranks] == [[0, 1], [1, 2]] and [r["pp_rank"] for r in ranks] == [0, 1]
        assert [r["kv_cache_bytes"] for r in ranks] == [one_stage["kv_cache_bytes"] // 2] * 2
        assert info["kv_bytes_per_block"] == one_stage["kv_bytes_per_block"] // 2
        # The weights are split, not copied: together the stages hold the one-stage model, plus a second
        # embedding table where it is tied (the last stage's lm_head).
        spec = local.spec
        table = spec.vocab_size * spec.hidden_size * 4 if spec.tie_word_embeddings else 0
        assert all(r["weight_bytes"] < one_stage["weight_bytes"] for r in ranks)
        assert sum(r["weight_bytes"] for r in ranks) == one_stage["weight_bytes"] + table
        # Both stages worked on the steps (the last one sampled, the first one embedded).
        assert all(r["pipeline_busy_seconds"] > 0 for r in ranks)

        if arch == "llama":
            # The first stage dies in the middle of a run: the engine reports it, and no worker is left.
            piped.add_request(Request("late", requests[3][0], requests[3][1], frozenset({0})))
            piped.step()
            first_stage = piped.executor.processes[0]
            first_stage.kill()
            first_stage.join()
            with pytest.raises(WorkerProcessError, match=r"worker process (died|is gone) \(rank 0"):
                for _ in range(100):
                    piped.step()
    finally:
        piped.shutdown()
    assert not any(p.is_alive() for p in piped.executor.processes)


@pytest.mark.slow  # four spawned worker processes (~30 s on 2 cores)
def test_tensor_and_pipeline_parallel_together(tiny_models):
    """TP=2 x PP=2 on 4 processes (ranks 0-1 the first stage, 2-3 the second) gives one process's results."""
    model_dir = tiny_models["llama"]
    requests = make_requests(read_hf_config(model_dir)["vocab_size"])
    expected = run(make_core(model_dir), requests)
    core = make_core(model_dir, tensor_parallel_size=2, pipeline_parallel_size=2)
    try:
        assert_same_results(run(core, requests), expected)
        ranks = core.engine_info()["ranks"]
        assert [r["layers"] for r in ranks] == [[0, 1], [0, 1], [1, 2], [1, 2]]
    finally:
        core.shutdown()
    assert not any(p.is_alive() for p in core.executor.processes)
