"""Structured outputs through the engine: a tiny random-weight model (its free output is noise) is held to JSON
schemas, regexes and choices by the grammar matchers, beside unconstrained requests that must not notice.

The acceptance batch: 64 schema-constrained requests at temperature 1.0 with 64 greedy unconstrained ones in
one batch; every constrained output parses, validates and stops; the unconstrained outputs equal a run without
constrained neighbours. The same under async scheduling and under forced preemption (a small KV cache).
"""

from __future__ import annotations

import json
import re
import threading
import time

import jsonschema
import pytest

from tokenmill import LLM, SamplingParams, StructuredOutputsParams
from tokenmill.structured_output import StructuredOutputCompileTimeout, StructuredOutputError

SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "admin": {"type": "boolean"},
        },
        "required": ["name", "age", "admin"],
    },
    {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "tags": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3},
        },
        "required": ["color", "tags"],
    },
    {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                               "active": {"type": "boolean"}},
                "required": ["id", "active"],
            },
            "level": {"enum": ["low", "high"]},
        },
        "required": ["user", "level"],
    },
    {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "items": {
                "type": "array",
                "maxItems": 2,
                "items": {"type": "object", "properties": {"k": {"enum": ["a", "b"]}}, "required": ["k"]},
            },
        },
        "required": ["ok", "items"],
    },
]
REGEX = r"[a-c]{2,4}-[0-9]{1,3}"
CHOICES = ["yes", "no", "maybe later"]
MAX_TOKENS = 96  # bounded schemas finish well within this


def make_llm(model_dir, **kwargs) -> LLM:
    return LLM(str(model_dir), dtype="float32", show_progress=False, max_num_batched_tokens=512, **kwargs)


def prompts(n: int) -> list[str]:
    return [f"Request {i}: describe item {i * 7 % 13}." for i in range(n)]


def constrained_params(i: int) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=1000 + i, max_tokens=MAX_TOKENS,
                          structured_outputs=StructuredOutputsParams(json=SCHEMAS[i % len(SCHEMAS)]))


def free_params() -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def check_json(outputs, offset: int = 0) -> None:
    for i, out in enumerate(outputs):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", (i, completion.text)
        jsonschema.validate(json.loads(completion.text), SCHEMAS[(i + offset) % len(SCHEMAS)])


def run_mixed(llm: LLM, num: int) -> tuple[list, list]:
    """num constrained and num unconstrained requests, interleaved in one batch."""
    ps = prompts(2 * num)
    params = [constrained_params(i // 2) if i % 2 == 0 else free_params() for i in range(2 * num)]
    outputs = llm.generate(ps, params, use_tqdm=False)
    return outputs[0::2], outputs[1::2]


def free_reference(llm: LLM, num: int) -> list[list[int]]:
    ps = prompts(2 * num)[1::2]
    return [o.outputs[0].token_ids for o in llm.generate(ps, [free_params()] * num, use_tqdm=False)]


def test_sampling_params_carry_structured_outputs_to_children():
    spec = StructuredOutputsParams(regex="a+")
    params = SamplingParams(n=3, structured_outputs=spec)
    assert params.clone_for_child(2).structured_outputs is spec
    with pytest.raises(ValueError, match="structured_outputs must be a StructuredOutputsParams"):
        SamplingParams(structured_outputs={"regex": "a+"})
    with pytest.raises(StructuredOutputError, match="choice is an empty list"):
        StructuredOutputsParams(choice=[])


def test_regex_choice_and_n_in_a_mixed_batch(server_model_dir):
    llm = make_llm(server_model_dir)
    params = [
        SamplingParams(temperature=1.0, seed=7, max_tokens=32,
                       structured_outputs=StructuredOutputsParams(regex=REGEX)),
        SamplingParams(temperature=1.0, seed=8, max_tokens=32, n=3,
                       structured_outputs=StructuredOutputsParams(choice=CHOICES)),
        free_params(),
        SamplingParams(temperature=0.8, seed=9, max_tokens=MAX_TOKENS, logprobs=2,
                       structured_outputs=StructuredOutputsParams(json_object=True, disable_any_whitespace=True)),
    ]
    regex_out, choice_out, free_out, object_out = llm.generate(prompts(4), params, use_tqdm=False)
    assert re.fullmatch(REGEX, regex_out.outputs[0].text) and regex_out.outputs[0].finish_reason == "stop"
    assert len(choice_out.outputs) == 3
    for completion in choice_out.outputs:
        assert completion.text in CHOICES and completion.finish_reason == "stop"
    assert len(free_out.outputs[0].token_ids) == 12
    # json_object may be cut by max_tokens (objects are unbounded); if it stopped, it is an object.
    completion = object_out.outputs[0]
    assert len(completion.logprobs) == len(completion.token_ids)
    if completion.finish_reason == "stop":
        assert isinstance(json.loads(completion.text), dict)
    else:
        assert completion.finish_reason == "length" and len(completion.token_ids) == MAX_TOKENS


def test_max_tokens_cut_finishes_with_length(server_model_dir):
    llm = make_llm(server_model_dir)
    spec = StructuredOutputsParams(json=SCHEMAS[0])
    [out] = llm.generate(["x"], SamplingParams(temperature=1.0, seed=1, max_tokens=3, structured_outputs=spec),
                         use_tqdm=False)
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 3


def test_min_tokens_yields_to_a_complete_grammar(server_model_dir):
    """min_tokens masks EOS, but a grammar that is complete allows nothing else: the grammar wins (as vLLM),
    and the output stops short of min_tokens with finish_reason "stop" instead of failing the request."""
    llm = make_llm(server_model_dir)
    spec = StructuredOutputsParams(choice=["yes"])
    outs = llm.generate(["x", "y"], [SamplingParams(temperature=t, seed=2, max_tokens=40, min_tokens=30,
                                                    structured_outputs=spec) for t in (0.0, 1.0)],
                        use_tqdm=False)
    for out in outs:
        completion = out.outputs[0]
        assert completion.text == "yes" and completion.finish_reason == "stop", completion
        assert len(completion.token_ids) < 30


def test_bad_grammar_fails_offline_with_value_error(server_model_dir):
    llm = make_llm(server_model_dir)
    # Valid syntax for llguidance's Lark and xgrammar's EBNF alike fails to parse as neither.
    spec = StructuredOutputsParams(grammar="root ::= undefined_rule")
    with pytest.raises(ValueError):
        llm.generate(["x"], SamplingParams(max_tokens=4, structured_outputs=spec), use_tqdm=False)
    # The engine is unaffected.
    [out] = llm.generate(["x"], free_params(), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 12


def test_compile_timeout_fails_only_its_own_request(server_model_dir, monkeypatch):
    llm = make_llm(server_model_dir, structured_outputs_compile_timeout=0.5)
    engine = llm.llm_engine
    manager = engine.core.structured_outputs
    release = threading.Event()
    slow_pattern = "z{3}"
    original = manager._compile

    def compile_slowly(choice, params):
        if params.regex == slow_pattern:
            release.wait(30)  # a compile that hangs past the timeout
        return original(choice, params)

    monkeypatch.setattr(manager, "_compile", compile_slowly)
    try:
        engine.add_request("slow", "x", SamplingParams(max_tokens=4,
                                                       structured_outputs=StructuredOutputsParams(regex=slow_pattern)))
        engine.add_request("fast", "y", SamplingParams(temperature=1.0, seed=2, max_tokens=16,
                                                       structured_outputs=StructuredOutputsParams(choice=CHOICES)))
        engine.add_request("free", "z", free_params())
        finished, errors = {}, {}
        deadline = time.monotonic() + 60
        while engine.has_unfinished_requests() and time.monotonic() < deadline:
            for out in engine.step(final_only=True):
                finished[out.request_id] = out
            errors.update(engine.take_errors())
        # The others ran while the slow grammar compiled, and finished.
        assert finished["fast"].outputs[0].text in CHOICES
        assert len(finished["free"].outputs[0].token_ids) == 12
        assert "slow" not in finished
        assert isinstance(errors["slow"], StructuredOutputCompileTimeout)
        assert "--structured-outputs-compile-timeout" in str(errors["slow"])
        assert not engine.has_unfinished_requests()
        engine.core.scheduler.check_integrity()
    finally:
        release.set()


@pytest.mark.slow
def test_acceptance_64_schemas_beside_64_free_requests(server_model_dir):
    llm = make_llm(server_model_dir, max_num_seqs=256)
    constrained, free = run_mixed(llm, 64)
    check_json(constrained)
    assert [o.outputs[0].token_ids for o in free] == free_reference(llm, 64)


@pytest.mark.slow
def test_async_scheduling_gives_the_same_structured_outputs(server_model_dir):
    sync_constrained, sync_free = run_mixed(make_llm(server_model_dir), 16)
    llm = make_llm(server_model_dir, async_scheduling=True)
    async_constrained, async_free = run_mixed(llm, 16)
    check_json(async_constrained)
    assert [o.outputs[0].text for o in async_constrained] == [o.outputs[0].text for o in sync_constrained]
    assert [o.outputs[0].token_ids for o in async_free] == [o.outputs[0].token_ids for o in sync_free]


@pytest.mark.slow
def test_preemption_gives_the_same_structured_outputs(server_model_dir):
    reference_constrained, reference_free = run_mixed(make_llm(server_model_dir), 16)
    # 24 blocks of 16 tokens for 32 requests of ~10-100 tokens: requests are preempted and recomputed.
    llm = make_llm(server_model_dir, kv_cache_memory=_bytes_for_blocks(server_model_dir, 24),
                   enable_prefix_caching=False)
    constrained, free = run_mixed(llm, 16)
    assert llm.llm_engine.core.scheduler.num_preemptions > 0
    check_json(constrained)
    assert [o.outputs[0].text for o in constrained] == [o.outputs[0].text for o in reference_constrained]
    assert [o.outputs[0].token_ids for o in free] == [o.outputs[0].token_ids for o in reference_free]


def _bytes_for_blocks(model_dir, num_blocks: int) -> int:
    import torch

    from tokenmill.model.loader import read_hf_config
    from tokenmill.planner import ModelArch, kv_cache_bytes_per_block

    arch = ModelArch.from_hf_config(read_hf_config(model_dir))
    return num_blocks * kv_cache_bytes_per_block(arch, 16, torch.float32)
