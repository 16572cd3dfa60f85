"""Async scheduling (step N+1 launched before step N's tokens reach the host) changes nothing a user sees.

Greedy outputs against transformers with async scheduling, chunked prefill and preemption are in
test_greedy_vs_transformers.py; here: every sampling feature, stops found one step late, aborts with a step
in flight, the block pool afterwards, and the step accounting.
"""

from __future__ import annotations

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.config import EngineConfig
from tokenmill.engine.engine_core import InFlightStep
from tokenmill.entrypoints.cli import build_parser
from tokenmill.entrypoints.generate_cli import engine_kwargs
from tokenmill.model.loader import read_hf_config
from tokenmill.outputs import SchedulerOutput
from tokenmill.planner import ModelArch, kv_cache_bytes_per_block


def make_llm(model_dir, async_scheduling: bool, **kwargs) -> LLM:
    kwargs.setdefault("max_num_batched_tokens", 48)  # long prompts arrive in chunks beside decodes
    return LLM(str(model_dir), dtype="float32", show_progress=False, async_scheduling=async_scheduling, **kwargs)


def prompts() -> list[str]:
    return [f"Paged attention {i} stores keys in blocks. " * (1 + i % 5) for i in range(10)]


def mixed_params(stop_token: int, stop_string: str) -> list[SamplingParams]:
    """Every sampling feature in one batch: greedy, seeded draws, logprobs, penalties, min_tokens, stop
    strings, n > 1, a stop token, ignore_eos."""
    return [
        SamplingParams(temperature=0, max_tokens=17),
        SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_tokens=21),
        SamplingParams(temperature=0, max_tokens=12, logprobs=3, prompt_logprobs=2),
        SamplingParams(temperature=0.7, top_k=20, seed=11, max_tokens=15, logprobs=1),
        SamplingParams(temperature=0, max_tokens=14, repetition_penalty=1.3, frequency_penalty=0.5),
        SamplingParams(temperature=0, max_tokens=10, min_tokens=6),
        SamplingParams(temperature=0, max_tokens=30, stop=[stop_string, "\u2603"]),
        SamplingParams(temperature=0.8, seed=5, n=3, max_tokens=9),
        SamplingParams(temperature=0, max_tokens=25, stop_token_ids=[stop_token]),
        SamplingParams(temperature=0, max_tokens=19, ignore_eos=True),
    ]


def rounded(positions):
    """Logprobs to 4 decimals: steps batch requests differently under async scheduling, and a float32 matmul
    over another batch shape may differ in the last bit."""
    if positions is None:
        return None
    return [None if p is None else {t: (round(lp.logprob, 4), lp.rank, lp.decoded_token) for t, lp in p.items()}
            for p in positions]


def summary(outputs) -> list:
    return [
        (rounded(o.prompt_logprobs), [(c.token_ids, c.text, c.finish_reason, c.stop_reason, rounded(c.logprobs),
                                       None if c.cumulative_logprob is None else round(c.cumulative_logprob, 3))
                                      for c in o.outputs])
        for o in outputs
    ]


def assert_all_freed(llm: LLM) -> None:
    core = llm.llm_engine.core
    assert not core.has_unfinished_requests()
    assert core.kv_cache_manager.usage == 0.0
    core.scheduler.check_integrity()


@pytest.mark.slow  # 4-17 s: two engines over many requests
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_every_sampling_feature_matches_sync(arch, tiny_models):
    sync = make_llm(tiny_models[arch], False)
    # A stop token and a stop string that greedy requests 8 and 6 really produce, so that they stop early
    # (found one step late under async scheduling).
    greedy = SamplingParams(temperature=0, max_tokens=25)
    probe = sync.generate([prompts()[6], prompts()[8]], greedy, use_tqdm=False)
    text = probe[0].outputs[0].text
    stop_string = text[len(text) // 2 : len(text) // 2 + 2]
    stop_token = probe[1].outputs[0].token_ids[6]
    params = mixed_params(stop_token, stop_string)
    expected = summary(sync.generate(prompts(), params, use_tqdm=False))
    assert expected[8][1][0][2:4] == ("stop", stop_token)
    assert expected[6][1][0][2:4] == ("stop", stop_string)

    llm = make_llm(tiny_models[arch], True)
    assert summary(llm.generate(prompts(), params, use_tqdm=False)) == expected
    assert_all_freed(llm)
    # The extra step launched for the requests that stopped on a token was collected with the last one.
    assert llm.llm_engine.core._in_flight is None


@pytest.mark.slow  # 4-17 s: two engines over many requests
def test_preemption_with_steps_in_flight_matches_sync(tiny_models):
    arch = ModelArch.from_hf_config(read_hf_config(tiny_models["llama"]))
    # 24 blocks of 16 tokens for 12 requests of up to ~150 tokens each.
    kwargs = dict(kv_cache_memory=24 * kv_cache_bytes_per_block(arch, 16, "float32"), max_model_len=256,
                  max_num_batched_tokens=64)
    texts = [p * 2 for p in prompts()] + prompts()[:2]
    params = [SamplingParams(temperature=0, max_tokens=40 + i) for i in range(len(texts))]
    runs = {}
    for mode in (False, True):
        llm = make_llm(tiny_models["llama"], mode, **kwargs)
        runs[mode] = summary(llm.generate(texts, params, use_tqdm=False))
        assert llm.llm_engine.core.scheduler.num_preemptions > 0, "the KV budget was meant to force preemption"
        assert_all_freed(llm)
    assert runs[True] == runs[False]


def test_abort_with_a_step_in_flight(tiny_models):
    llm = make_llm(tiny_models["qwen2"], True)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=12)
    for i, prompt in enumerate(prompts()[:4]):
        engine.add_request(f"r{i}", prompt, params)
    for _ in range(4):
        engine.step()
    assert engine.core._in_flight is not None
    engine.abort_request(["r1", "r2"])
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
    assert sorted(finished) == ["r0", "r3"]
    reference = make_llm(tiny_models["qwen2"], False).generate([prompts()[0], prompts()[3]], params, use_tqdm=False)
    assert [finished["r0"], finished["r3"]] == [o.outputs[0].token_ids for o in reference]
    # Aborting the last requests collects the step in flight at once: nothing is left running.
    engine.add_request("r9", prompts()[5], params)
    engine.step()
    engine.step()
    engine.abort_request("r9")
    assert engine.core._in_flight is None
    assert_all_freed(llm)


def test_outputs_arrive_one_step_later_and_steps_are_counted_once(tiny_models):
    llm = make_llm(tiny_models["llama"], True)
    engine = llm.llm_engine
    engine.add_request("a", prompts()[0], SamplingParams(temperature=0, max_tokens=5))
    assert engine.step() == []  # the prefill is launched; its token is collected by the next step
    seen = []
    while engine.has_unfinished_requests():
        seen += [len(o.outputs[0].token_ids) for o in engine.step()]
    assert seen == [1, 2, 3, 4, 5]
    core = engine.core
    # max_tokens is known on the host: the step after the last token is never launched.
    assert core.num_steps == 5
    assert core.num_generated_tokens == 5 and core.busy_seconds > 0
    # A stop token is only seen at collection, after the next step was launched: that step is collected at
    # once when nothing else runs (idle time is never charged to it), and its token is dropped.
    token = llm.generate(prompts()[1], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    stop = token.outputs[0].token_ids[2]
    out = llm.generate(prompts()[1], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop]),
                       use_tqdm=False)[0]
    assert out.outputs[0].token_ids == token.outputs[0].token_ids[:3] and out.outputs[0].finish_reason == "stop"
    assert core._in_flight is None


def test_a_pending_token_needs_the_step_that_samples_it(tiny_models):
    llm = make_llm(tiny_models["llama"], True)
    core = llm.llm_engine.core
    llm.llm_engine.add_request("a", prompts()[0], SamplingParams(temperature=0, max_tokens=5))
    core.step()
    sched = core.scheduler.schedule()
    assert core.scheduler.requests["a"].num_pending_tokens == 1 and sched.num_scheduled_tokens == {"a": 1}
    with pytest.raises(RuntimeError, match="pending"):
        core.runner.launch(sched, prev=None)
    assert isinstance(core._in_flight, InFlightStep) and core._in_flight.sched is not sched
    assert SchedulerOutput().is_empty


def test_flag_and_config():
    args = build_parser().parse_args(["serve", "--async-scheduling"])
    assert engine_kwargs(args)["async_scheduling"] is True
    assert EngineConfig.from_kwargs(async_scheduling=True).scheduler.async_scheduling is True
    with pytest.raises(ValueError, match="async_scheduling must be True or False"):
        EngineConfig.from_kwargs(async_scheduling="yes")
