"""StructuredOutputManager: the compile cache, the auto backend's routing, errors from the backends, and the
compile timeout that fails only its own request."""

from __future__ import annotations

import time

import pytest

from tests.structured_output.sampling import sample_masked
from tokenmill.structured_output import (
    StructuredOutputCompileTimeout,
    StructuredOutputError,
    StructuredOutputManager,
    StructuredOutputsParams,
)

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
# A real schema that is slow to compile: xgrammar takes seconds for a 10,000-value enum (2.8 s measured
# for the tiny tokenizer).
SLOW_SCHEMA = {"enum": [f"value_{i}_x" for i in range(10_000)]}


def test_cache_hit_returns_the_same_compiled_grammar(tiny_tokenizer):
    manager = StructuredOutputManager(tiny_tokenizer)
    try:
        first = manager.compile(StructuredOutputsParams(json=SCHEMA))
        # The same schema as text with other spacing: the same normalised specification.
        again = manager.compile(StructuredOutputsParams(json='{"type": "object", "properties": {"a": '
                                                              '{"type": "integer"}}, "required": ["a"]}'))
        assert again is first
        assert manager.num_compiles == 1 and manager.num_cache_hits == 1
        other = manager.compile(StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True))
        assert other is not first
        # The matchers are per sequence.
        assert first.matcher() is not first.matcher()
        # A request choosing another backend compiles its own.
        guidance = manager.compile(StructuredOutputsParams(json=SCHEMA, backend="guidance"))
        assert guidance is not first and guidance.backend.name == "guidance"
        assert manager.num_compiles == 3
    finally:
        manager.shutdown()


def test_cache_is_bounded(tiny_tokenizer):
    manager = StructuredOutputManager(tiny_tokenizer, max_cached_grammars=2)
    try:
        first = manager.compile(StructuredOutputsParams(regex="a+"))
        manager.compile(StructuredOutputsParams(regex="b+"))
        manager.compile(StructuredOutputsParams(regex="c+"))
        assert manager.compile(StructuredOutputsParams(regex="a+")) is not first
    finally:
        manager.shutdown()


def test_auto_backend_routes_unenforced_keywords_to_guidance(tiny_manager, tiny_tokenizer):
    plain = tiny_manager.compile(StructuredOutputsParams(json=SCHEMA))
    assert plain.backend.name == "xgrammar"
    # xgrammar ignores a multi-entry allOf; llguidance enforces it.
    both = {"allOf": [{"type": "integer"}, {"minimum": 5, "maximum": 9}]}
    compiled = tiny_manager.compile(StructuredOutputsParams(json=both))
    assert compiled.backend.name == "guidance"
    for seed in range(5):
        token_ids, terminated = sample_masked(compiled.matcher(), tiny_tokenizer.vocab_size, seed, 50)
        assert terminated and 5 <= int(tiny_tokenizer.decode(token_ids)) <= 9
    # Named by the request: xgrammar refuses rather than ignore the keyword.
    with pytest.raises(StructuredOutputError, match="does not enforce the JSON-schema keyword.*allOf"):
        tiny_manager.compile(StructuredOutputsParams(json=both, backend="xgrammar"))
    # Neither enforces uniqueItems: auto refuses it by name.
    unique = {"type": "array", "items": {"enum": [1, 2, 3]}, "uniqueItems": True, "maxItems": 3}
    with pytest.raises(StructuredOutputError, match="structured_outputs.json.*uniqueItems"):
        tiny_manager.compile(StructuredOutputsParams(json=unique))


@pytest.mark.parametrize("backend", ["auto", "xgrammar", "guidance"])
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"json": {"type": "integer", "minimum": 5, "maximum": 3}}, "structured_outputs.json"),
        ({"regex": "(?<=a)b"}, "structured_outputs.regex"),
        ({"grammar": 'root ::= undefined_rule'}, "structured_outputs.grammar"),
    ],
    ids=["unsatisfiable-schema", "lookbehind-regex", "undefined-rule"],
)
def test_backend_rejections_are_clear_errors(tiny_manager, backend, kwargs, message):
    params = StructuredOutputsParams(**kwargs, backend=backend)
    pending = tiny_manager.submit(params)
    with pytest.raises(StructuredOutputError, match=message):
        pending.result()
    # A failure is not cached: the next request with it fails on its own.
    with pytest.raises(StructuredOutputError, match=message):
        tiny_manager.compile(params)


def test_unsupported_keyword_is_refused_by_guidance(tiny_manager):
    schema = {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}
    with pytest.raises(StructuredOutputError, match="structured_outputs.json.*(if|then)"):
        tiny_manager.compile(StructuredOutputsParams(json=schema))


def wait_for(pending, limit_s: float):
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        compiled = pending.poll()
        if compiled is not None:
            return compiled
        time.sleep(0.005)
    raise AssertionError(f"poll() neither returned nor raised within {limit_s} s")


def test_compile_timeout_fails_only_its_own_request(tiny_tokenizer):
    manager = StructuredOutputManager(tiny_tokenizer, backend="xgrammar", compile_timeout_s=0.3)
    try:
        manager.compile(StructuredOutputsParams(regex="warm"), timeout_s=120)  # tokenizer tables built
        slow = manager.submit(StructuredOutputsParams(json=SLOW_SCHEMA))
        fast = manager.submit(StructuredOutputsParams(json=SCHEMA))
        assert slow.poll() is None  # never blocks
        assert wait_for(fast, 0.3 + 5).matcher().accept_token(tiny_tokenizer.encode("{", add_special_tokens=False)[0])
        with pytest.raises(StructuredOutputCompileTimeout, match="took longer than 0.3 s"):
            wait_for(slow, 10)
        assert isinstance(StructuredOutputCompileTimeout("x"), ValueError)
        # The slow compile still holds its thread, but no longer a compile slot: with both slots' worth of
        # new work, nothing queues behind it.
        later = [manager.submit(StructuredOutputsParams(regex=f"x{i}+"), timeout_s=60) for i in range(3)]
        for pending in later:
            assert wait_for(pending, 60) is not None
    finally:
        manager.shutdown()


def test_compile_runs_off_the_callers_thread(tiny_tokenizer):
    manager = StructuredOutputManager(tiny_tokenizer, backend="xgrammar")
    try:
        manager.compile(StructuredOutputsParams(regex="warm"))
        # A compile of tens of milliseconds at least: submit returns while it is still running.
        pending = manager.submit(StructuredOutputsParams(json={"enum": [f"v{i}" for i in range(2000)]}))
        assert pending.poll() is None and not pending.done()
        compiled = pending.result()
        assert pending.done() and pending.poll() is compiled
        assert compiled.compile_time_s > 0
    finally:
        manager.shutdown()


def test_manager_argument_errors(tiny_tokenizer):
    with pytest.raises(ValueError, match="backend must be one of auto, xgrammar, guidance"):
        StructuredOutputManager(tiny_tokenizer, backend="outlines")
    with pytest.raises(ValueError, match="compile_timeout_s must be > 0"):
        StructuredOutputManager(tiny_tokenizer, compile_timeout_s=0)
