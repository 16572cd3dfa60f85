"""Tensor parallelism on the CPU (gloo over 127.0.0.1): TP=2 worker processes give TP=1's greedy tokens and
prompt logprobs for every tiny architecture (plain, chunked prefill, preemption), TP=3 replicates KV heads and
pads the vocabulary, a killed rank takes the engine down with an error and leaves no process behind, and bad
sizes are refused before any process starts, with the valid sizes."""

from __future__ import annotations

import threading

import psutil
import pytest
import torch

from tests.model.quant_checkpoints import CHECKPOINTS, gguf_cache_dir
from tests.tiny_models import TINY_ARCHS, build_tiny_model
from tokenmill.config import EngineConfig
from tokenmill.engine.engine_core import EngineCore
from tokenmill.model.default_model import find_default_gguf
from tokenmill.model.loader import read_hf_config
from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.executor import MultiprocExecutor, WorkerProcessError
from tokenmill.worker.worker import check_tensor_parallel_size

MAX_TOKENS = 10
# With a budget of 24 tokens per step the long prompts are prefilled in chunks beside the decodes; 10 blocks of
# 16 tokens do not hold all six requests at once (preemption).
PROMPT_LENGTHS = (5, 70, 33, 90, 8, 51)


def make_core(model_dir, tp: int, **kwargs) -> EngineCore:
    kwargs = {"num_gpu_blocks_override": 10, **kwargs}
    config = EngineConfig.from_kwargs(
        str(model_dir), dtype="float32", device="cpu", max_num_batched_tokens=24, max_model_len=128,
        tensor_parallel_size=tp, **kwargs,
    )
    return EngineCore(config, model_dir, show_progress=False)


def make_prompts(vocab_size: int, lengths=PROMPT_LENGTHS) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lengths]


def run(core: EngineCore, prompts: list[list[int]], params: list[SamplingParams], tag: str) -> dict[str, dict]:
    """request id -> {"tokens", "prompt_logprobs", "logprobs"} of a batch run to completion."""
    results: dict[str, dict] = {}
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        core.add_request(Request(f"{tag}{i}", prompt, p, frozenset({0})))
        results[f"{tag}{i}"] = {"tokens": [], "prompt_logprobs": [], "logprobs": []}
    while core.has_unfinished_requests():
        for out in core.step():
            r = results[out.request_id]
            r["tokens"] += out.new_token_ids
            r["prompt_logprobs"] += out.new_prompt_logprobs or []
            r["logprobs"] += out.new_logprobs or []
    return results


def assert_logprobs_close(expected: list[dict], got: list[dict], tol: float = 1e-4) -> None:
    """Within tol, plus 2e-6 of the logprob's size: a logprob of -125 (the random tiny models give such) comes from
    logits of that size, whose float32 sums in another order (each rank's share of a row-parallel layer, then the
    all-reduce) differ by a few units in their last place, ~1e-5 each."""
    assert len(expected) == len(got)
    for e, g in zip(expected, got, strict=True):
        assert e.keys() == g.keys()
        for token, lp in e.items():
            assert abs(lp.logprob - g[token].logprob) <= tol + 2e-6 * abs(lp.logprob), (token, lp.logprob,
                                                                                       g[token].logprob)


def compare(reference: EngineCore, sharded: EngineCore, prompts, params, tag: str) -> None:
    expected = run(reference, prompts, params, tag)
    got = run(sharded, prompts, params, tag)
    for request_id, e in expected.items():
        g = got[request_id]
        assert g["tokens"] == e["tokens"], request_id
        assert_logprobs_close(e["prompt_logprobs"], g["prompt_logprobs"])
        assert_logprobs_close(e["logprobs"], g["logprobs"])


def batch_params(n: int) -> list[SamplingParams]:
    params = [SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True) for _ in range(n)]
    params[1] = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, prompt_logprobs=2)
    params[3] = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=3)
    params[4] = SamplingParams(temperature=1.0, seed=5, max_tokens=MAX_TOKENS, ignore_eos=True)
    return params


@pytest.mark.slow  # two worker processes start per architecture (~5 s each)
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tp2_matches_tp1(tiny_models, arch):
    """TP=2 in two processes: the same greedy (and seeded) tokens as TP=1, and prompt / sampled logprobs within
    1e-4, for a lone request (plain) and a batch with chunked prefill and preemption."""
    model_dir = tiny_models[arch]
    reference = make_core(model_dir, 1)
    sharded = make_core(model_dir, 2)
    try:
        assert isinstance(sharded.executor, MultiprocExecutor) and len(sharded.executor.processes) == 2
        assert sharded.config.distributed_executor_backend == "mp"  # chosen for more than one rank
        prompts = make_prompts(reference.spec.vocab_size)
        lone = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, prompt_logprobs=1)
        sharded.set_step_timing(True)
        compare(reference, sharded, [prompts[4]], [lone], "plain")
        assert sharded.scheduler.num_preemptions == 0
        # The output rank times its collectives (all-reduces, the logits' gather, the tokens' broadcast).
        timings = sharded.take_step_timings()
        sharded.set_step_timing(False)
        assert timings and all(0 < t.collectives < t.step for t in timings)
        compare(reference, sharded, prompts, batch_params(len(prompts)), "batch")
        assert sharded.scheduler.num_preemptions > 0 and reference.scheduler.num_preemptions > 0
        # Each rank holds half the KV heads (2 -> 1) and about half the weights.
        facts, ref_facts = sharded.engine_info(), reference.engine_info()
        assert facts["tensor_parallel_size"] == 2 and [r["rank"] for r in facts["ranks"]] == [0, 1]
        ref_kv = ref_facts["kv_cache_bytes"]
        assert all(r["kv_cache_bytes"] == ref_kv // 2 for r in facts["ranks"])
        assert all(r["weight_bytes"] < 0.7 * ref_facts["weight_bytes"] for r in facts["ranks"])
        assert sharded.kv_sizing.bytes_per_block == reference.kv_sizing.bytes_per_block // 2
    finally:
        sharded.shutdown()
        reference.shutdown()
    assert not any(p.is_alive() for p in sharded.executor.processes)


@pytest.fixture(scope="module")
def nine_head_model(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny Qwen2 (q/k/v bias, tied embeddings) with SmolLM2's 9 query / 3 KV heads, and a vocabulary of 389
    (not a multiple of 2 or 3: the vocabulary-parallel table is padded)."""
    return build_tiny_model("qwen2", tmp_path_factory.mktemp("nine_heads") / "qwen2", tiny_tokenizer_dir,
                            hidden_size=72, intermediate_size=96, num_attention_heads=9, num_key_value_heads=3,
                            vocab_size=389)


@pytest.mark.slow  # three worker processes
def test_tp3_on_three_kv_heads_matches_tp1(nine_head_model):
    reference = make_core(nine_head_model, 1)
    sharded = make_core(nine_head_model, 3)
    try:
        prompts = make_prompts(384)
        compare(reference, sharded, prompts, batch_params(len(prompts)), "batch")
        assert sharded.scheduler.num_preemptions > 0
        assert [r["kv_cache_bytes"] for r in sharded.engine_info()["ranks"]] == \
            [reference.engine_info()["kv_cache_bytes"] // 3] * 3
    finally:
        sharded.shutdown()
        reference.shutdown()


@pytest.mark.slow  # two worker processes
def test_replicated_kv_heads_then_a_killed_rank(tmp_path, tiny_tokenizer_dir):
    """4 query heads over 1 KV head (multi-query) at TP=2: each rank holds a copy of the one KV head and the
    tokens are TP=1's. Then rank 1 is killed mid-run: the engine raises WorkerProcessError naming the rank and
    its exit code, every worker process is gone (the survivor was blocked in a collective with the dead rank),
    and no process or thread is left behind."""
    model_dir = build_tiny_model("llama", tmp_path / "mqa", tiny_tokenizer_dir, num_key_value_heads=1)
    threads_before = {t.ident for t in threading.enumerate()}
    reference = make_core(model_dir, 1)
    core = make_core(model_dir, 2)
    executor = core.executor
    assert isinstance(executor, MultiprocExecutor)
    pids = [p.pid for p in executor.processes]
    try:
        prompts = make_prompts(384, (5, 40, 20))
        compare(reference, core, prompts, [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)] * 3,
                "mqa")
        assert all(r["kv_cache_bytes"] == reference.engine_info()["kv_cache_bytes"]
                   for r in core.engine_info()["ranks"])

        for i, prompt in enumerate(make_prompts(384)):
            core.add_request(Request(f"r{i}", prompt, SamplingParams(max_tokens=50, ignore_eos=True),
                                     frozenset({0})))
        for _ in range(3):
            core.step()
        executor.processes[1].kill()  # mid-run: requests are running, rank 0 waits for rank 1 in collectives
        with pytest.raises(WorkerProcessError, match=r"worker process died \(rank 1, exit code -9\)"):
            for _ in range(100):
                core.step()
        assert not any(p.is_alive() for p in executor.processes)
        with pytest.raises(WorkerProcessError, match="rank 1"):
            core.step()  # the engine stays failed
    finally:
        core.shutdown()
        reference.shutdown()
    children = {c.pid for c in psutil.Process().children(recursive=True)}
    assert not children & set(pids)
    assert {t.ident for t in threading.enumerate()} <= threads_before


@pytest.mark.slow  # the bundled 135M model in three worker processes (~40 s)
def test_bundled_model_at_tp3_answers():
    """SmolLM2-135M (GGUF Q4_1 kept quantized, 9 query / 3 KV heads, tied Q8_0 embeddings) split over 3 ranks."""
    from tokenmill import LLM

    try:
        find_default_gguf()
    except FileNotFoundError as e:
        pytest.skip(f"bundled model not installed ({e})")
    llm = LLM(dtype="float32", tensor_parallel_size=3, kv_cache_memory="64MiB", show_progress=False)
    try:
        out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                       SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
        assert "Paris" in out[0].outputs[0].text, out[0].outputs[0].text
    finally:
        llm.llm_engine.shutdown()


def test_bad_sizes_list_the_valid_ones(llama_dir, nine_head_model):
    """Refused before any worker process starts: the planner's rule on the heads, listing the valid sizes."""
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4 does not divide .*num_attention_heads=9, "
                                         r"num_key_value_heads=3\): use one of 1, 3"):
        make_core(nine_head_model, 4)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 does not divide .*use one of 1, 2, 4"):
        make_core(llama_dir, 3)
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer, got 0"):
        make_core(llama_dir, 0)
    with pytest.raises(ValueError, match="distributed_executor_backend='uni' runs one rank"):
        make_core(llama_dir, 2, distributed_executor_backend="uni")
    with pytest.raises(ValueError, match=r"pipeline_parallel_size=9 exceeds the \d+ decoder layers .* use 1 to \d+"):
        make_core(llama_dir, 1, pipeline_parallel_size=9)
    with pytest.raises(ValueError, match="num_gpu_blocks_override must be a positive integer, got 0"):
        make_core(llama_dir, 1, num_gpu_blocks_override=0)
    if torch.cuda.device_count() < 2:
        with pytest.raises(ValueError, match=rf"2 ranks need 2 GPUs, but {torch.cuda.device_count()} are visible"):
            EngineCore(EngineConfig.from_kwargs(str(llama_dir), device="cuda", tensor_parallel_size=2), llama_dir,
                       show_progress=False)


def test_the_bundled_model_does_not_split_in_two():
    """SmolLM2-135M's 9 query heads do not split over 2 ranks: the error says which sizes do."""
    from tokenmill import LLM

    try:
        find_default_gguf()
    except FileNotFoundError as e:
        pytest.skip(f"bundled model not installed ({e})")
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 does not divide .*use one of 1, 3"):
        LLM(tensor_parallel_size=2, show_progress=False)


@pytest.mark.parametrize("method", sorted(CHECKPOINTS))
def test_every_weight_format_splits(method, tmp_path, tiny_models, tiny_tokenizer_dir):
    """Full precision, int8/int4 quantized at load, GGUF blocks and the packed checkpoint formats (AWQ, GPTQ,
    compressed-tensors, FP8) all split over 2 ranks; tests/worker/test_tensor_parallel_quant.py runs them."""
    model_dir, quantization = CHECKPOINTS[method](tmp_path, tiny_models, tiny_tokenizer_dir)
    check_tensor_parallel_size(read_hf_config(model_dir), 2, quantization=quantization)


def test_gguf_blocks_limit_the_sizes(tmp_path, tiny_tokenizer_dir):
    """down_proj's 512 inputs in Q6_K blocks of 256 split in 2, not in 4 (128 inputs per rank)."""
    model_dir = gguf_cache_dir(tmp_path / "gguf", tiny_tokenizer_dir)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj: its 512 inputs split over "
                                         r"tensor_parallel_size=4 give 128 per rank, which cuts through the "
                                         r"256-input blocks .* sizes that split this layer are 1, 2$"):
        make_core(model_dir, 4)


@pytest.mark.slow  # two worker processes
def test_gguf_blocks_at_tp2_match_tp1(tmp_path, tiny_tokenizer_dir):
    """A converted GGUF cache mixing Q4_K, Q6_K, Q4_0, Q4_1 and a tied Q8_0 embedding, kept quantized: each
    rank holds whole blocks of its rows / columns, and the tokens are TP=1's."""
    model_dir = gguf_cache_dir(tmp_path / "gguf", tiny_tokenizer_dir)
    reference = make_core(model_dir, 1)
    sharded = make_core(model_dir, 2)
    try:
        prompts = make_prompts(384, (5, 40, 20))
        compare(reference, sharded, prompts, [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                             prompt_logprobs=1)] * 3, "gguf")
    finally:
        sharded.shutdown()
        reference.shutdown()


@pytest.mark.slow  # two worker processes
def test_int8_quantized_at_load_at_tp2(tiny_models):
    """int8 quantized at load by each rank from its slice of the full-precision weights. Column-parallel rows
    keep TP=1's per-channel scales; a row-parallel layer's scales come from the rank's half of each row, so the
    logprobs stay near TP=1's rather than equal (a wrongly cut slice would be off by whole nats)."""
    model_dir = tiny_models["qwen3"]
    reference = make_core(model_dir, 1, quantization="int8")
    sharded = make_core(model_dir, 2, quantization="int8")
    try:
        prompts = make_prompts(384, (5, 40))
        params = [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=0)] * 2
        expected, got = run(reference, prompts, params, "q"), run(sharded, prompts, params, "q")
        for request_id, e in expected.items():
            assert_logprobs_close(e["prompt_logprobs"], got[request_id]["prompt_logprobs"], tol=0.1)
    finally:
        sharded.shutdown()
        reference.shutdown()
