"""The worker behind the serialized step contract: SchedulerOutput and ModelRunnerOutput round-trip through
msgpack, and a worker in a spawned process gives the in-process engine's outputs token for token."""

from __future__ import annotations

import pytest
import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.engine_core import EngineCore
from tokenmill.model.loader import read_hf_config
from tokenmill.outputs import ModelRunnerOutput, SchedulerOutput
from tokenmill.planner import ModelArch, kv_cache_bytes_per_block
from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.executor import MultiprocExecutor, UniProcExecutor, WorkerProcessError
from tokenmill.worker.serial import MsgpackDecoder, MsgpackEncoder

MAX_TOKENS = 12


def make_prompts(vocab_size: int, lengths=(5, 70, 33, 90, 8, 51)) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lengths]


def make_core(model_dir, backend: str = "uni", **kwargs) -> EngineCore:
    # 10 blocks of 16 tokens: not all requests fit together (preemption); a budget of 24 tokens chunks the
    # long prompts beside the decodes.
    arch = ModelArch.from_hf_config(read_hf_config(model_dir))
    config = EngineConfig.from_kwargs(
        str(model_dir), dtype="float32", device="cpu", max_num_batched_tokens=24, max_model_len=128,
        kv_cache_memory=10 * kv_cache_bytes_per_block(arch, 16, "float32"),
        distributed_executor_backend=backend, **kwargs,
    )
    return EngineCore(config, model_dir, show_progress=False)


def run(core: EngineCore, prompts: list[list[int]], params: list[SamplingParams]) -> dict[str, list[int]]:
    """request id -> its output tokens."""
    outputs: dict[str, list[int]] = {}
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        core.add_request(Request(f"r{i}", prompt, p, frozenset({0})))
        outputs[f"r{i}"] = []
    while core.has_unfinished_requests():
        for out in core.step():
            outputs[out.request_id] += out.new_token_ids
    return outputs


def test_step_contract_round_trips_through_msgpack(tiny_models):
    """Every SchedulerOutput and ModelRunnerOutput of a run with chunked prefill, preemption, logprobs, prompt
    logprobs, penalties and a seed decodes to an equal object, and is plain data: no Request crosses."""
    core = make_core(tiny_models["llama"])
    encoder, decoder = MsgpackEncoder(), MsgpackDecoder()
    executor = core.executor
    assert isinstance(executor, UniProcExecutor)
    seen: dict[str, int] = {"sched": 0, "runner": 0, "new": 0, "cached": 0, "preempted": 0, "finished": 0}
    launch, collect = executor.launch, executor.collect

    def checked_launch(sched: SchedulerOutput) -> None:
        copy = decoder.decode(encoder.encode(sched))
        assert copy == sched
        seen["sched"] += 1
        seen["new"] += len(sched.new_requests)
        seen["cached"] += len(sched.cached_requests.request_ids)
        seen["preempted"] += len(sched.preempted_ids)
        seen["finished"] += len(sched.finished_request_ids)
        launch(copy)  # the runner works from the decoded copy

    def checked_collect() -> ModelRunnerOutput:
        out = collect()
        copy = decoder.decode(encoder.encode(out))
        assert copy == out
        seen["runner"] += 1
        return copy

    executor.launch, executor.collect = checked_launch, checked_collect
    prompts = make_prompts(core.spec.vocab_size)
    params = [SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=2 if i % 2 else None,
                             prompt_logprobs=1 if i == 1 else None, repetition_penalty=1.2 if i == 2 else 1.0)
              for i in range(len(prompts))]
    params[3] = SamplingParams(temperature=0.8, seed=7, max_tokens=MAX_TOKENS)
    outputs = run(core, prompts, params)
    assert all(len(tokens) == MAX_TOKENS or tokens[-1] == 0 for tokens in outputs.values())
    assert seen["sched"] == seen["runner"] > 0
    assert seen["preempted"] > 0 and seen["new"] > len(prompts) and seen["cached"] > 0
    # The runner is told about every request's end (here the last ends reach it at the next step, if any).
    assert seen["finished"] >= len(prompts) - 2
    stats = core.scheduler_stats()  # the core's one stats surface
    assert stats.num_preemptions == core.scheduler.num_preemptions > 0
    assert stats.num_steps == core.num_steps == seen["sched"] and stats.busy_seconds > 0
    assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0.0)


def test_decoder_refuses_classes_outside_tokenmill():
    import msgpack

    message = msgpack.packb([msgpack.ExtType(1, b""), "subprocess:Popen", ["true"]])
    with pytest.raises(ValueError, match="refusing to decode subprocess:Popen"):
        MsgpackDecoder().decode(message)


@pytest.mark.slow  # a spawned worker process imports torch and loads the model (~10 s)
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_worker_process_matches_in_process_engine(tiny_models, async_scheduling):
    """Greedy and seeded requests, chunked prefill and preemption: the worker in a spawned process, driven by
    msgpack over a pipe, gives the same tokens as the in-process worker."""
    model_dir = tiny_models["llama"]
    prompts = make_prompts(read_hf_config(model_dir)["vocab_size"])
    params = [SamplingParams(temperature=0, max_tokens=MAX_TOKENS) for _ in prompts]
    params[2] = SamplingParams(temperature=1.0, seed=3, max_tokens=MAX_TOKENS)
    params[4] = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, min_tokens=4, presence_penalty=1.0)
    local = make_core(model_dir, async_scheduling=async_scheduling)
    expected = run(local, prompts, params)
    assert local.scheduler.num_preemptions > 0, "the KV budget was meant to force preemption"
    remote = make_core(model_dir, "mp", async_scheduling=async_scheduling)
    try:
        assert isinstance(remote.executor, MultiprocExecutor)
        assert remote.spec == local.spec and remote.kv_sizing == local.kv_sizing
        assert run(remote, prompts, params) == expected
        assert remote.scheduler.num_preemptions > 0
        with pytest.raises(AttributeError, match="another process"):
            remote.runner  # noqa: B018
        # A worker process that dies is reported, not waited for.
        remote.executor._process.kill()
        remote.executor._process.join()
        remote.add_request(Request("late", prompts[0], params[0], frozenset({0})))
        with pytest.raises(WorkerProcessError, match="worker process (died|is gone)"):
            remote.step()
    finally:
        remote.shutdown()
    assert not remote.executor._process.is_alive()


@pytest.mark.slow
def test_worker_process_start_up_error_reaches_the_engine(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WorkerProcessError, match="worker process failed"):
        EngineCore(EngineConfig.from_kwargs(str(tmp_path), device="cpu", distributed_executor_backend="mp"),
                   tmp_path, show_progress=False)


@pytest.mark.slow
def test_worker_process_runs_structured_outputs(server_model_dir):
    """Constrained requests (the worker process compiles its own matchers) beside free ones, seeded, under
    preemption: the same tokens as in-process, and every constrained output is one of the choices."""
    from tokenmill.model.tokenizer import Tokenizer
    from tokenmill.structured_output.params import StructuredOutputsParams

    tokenizer = Tokenizer.from_pretrained(server_model_dir)
    choices = ["yes", "no", "maybe"]
    spec = StructuredOutputsParams(choice=choices)
    prompts = make_prompts(read_hf_config(server_model_dir)["vocab_size"])
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=24,
                             structured_outputs=spec if i % 2 == 0 else None) for i in range(len(prompts))]
    eos = frozenset(tokenizer.eos_token_ids)

    def run_with(core: EngineCore) -> dict[str, list[int]]:
        outputs: dict[str, list[int]] = {}
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            core.add_request(Request(f"r{i}", prompt, p, eos))
            outputs[f"r{i}"] = []
        while core.has_unfinished_requests():
            for out in core.step():
                outputs[out.request_id] += out.new_token_ids
        return outputs

    expected = run_with(make_core(server_model_dir))
    for i in range(0, len(prompts), 2):
        text = tokenizer.decode([t for t in expected[f"r{i}"] if t not in eos])
        assert text in choices, text
    remote = make_core(server_model_dir, "mp")
    try:
        assert run_with(remote) == expected
        assert remote.scheduler.num_preemptions > 0
    finally:
        remote.shutdown()
