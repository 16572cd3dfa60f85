"""Output throughput with structured outputs against none, side by side in one run (bundled model).

    python benchmarks/structured_output_throughput.py                       # 64 requests, half under a schema
    python benchmarks/structured_output_throughput.py --num-requests 64 --max-tokens 64 --rounds 2

The same 64 prompts run twice per round: once with every other request under a JSON schema (temperature 0.8,
seeded), once with the same sampling parameters and no constraint. Rounds alternate the two so that a busy
machine hurts both alike. Reported: output tokens per second of each and their ratio, the time the sampler
spends on logits processors per step (grammar bitmask fill + apply, measured around Sampler._apply_processors
in steps with a constrained row), and the compile time of three schemas cold and cached (through the engine's StructuredOutputManager).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402

SCHEMAS = [
    {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]}, "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}},
     "required": ["name", "age", "role", "active", "tags"]},
    {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20}, "population": {"type": "integer", "minimum": 0},
        "coords": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                   "required": ["lat", "lon"]}},
     "required": ["city", "population", "coords"]},
    {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 30}, "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
        "genres": {"type": "array", "items": {"enum": ["drama", "comedy", "action", "documentary"]}, "maxItems": 2},
        "rating": {"type": "number", "minimum": 0, "maximum": 10}},
     "required": ["title", "year", "genres", "rating"]},
]
TOPICS = ["a person", "a city", "a film"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()

    llm = LLM(max_num_seqs=args.num_requests, show_progress=False)
    engine = llm.llm_engine
    manager = engine.core.structured_outputs
    results: dict = {}

    # Compile: tokenizer tables (first use), then the schemas cold and from the cache.
    start = time.perf_counter()
    manager.compile(StructuredOutputsParams(regex="[a-z]+"))
    results["setup_ms"] = (time.perf_counter() - start) * 1e3
    for key in ("cold_ms", "cached_ms"):
        results[key] = []
        for schema in SCHEMAS:
            start = time.perf_counter()
            manager.compile(StructuredOutputsParams(json=schema))
            results[key].append((time.perf_counter() - start) * 1e3)

    tokenizer = engine.tokenizer
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": f"Describe {TOPICS[i % 3]} as JSON ({i})."}],
                                      add_generation_prompt=True)
        for i in range(args.num_requests)
    ]

    def params(constrained: bool) -> list[SamplingParams]:
        out = []
        for i in range(args.num_requests):
            spec = StructuredOutputsParams(json=SCHEMAS[i % 3]) if constrained and i % 2 == 0 else None
            out.append(SamplingParams(temperature=0.8, seed=i, max_tokens=args.max_tokens, structured_outputs=spec))
        return out

    sampler = engine.core.runner.sampler
    grammar_times: list[float] = []
    apply_processors = sampler._apply_processors

    def timed_apply(logits, requests):
        start = time.perf_counter()
        result = apply_processors(logits, requests)
        if any(r.sampling_params.structured_outputs is not None for r in requests):
            grammar_times.append(time.perf_counter() - start)
        return result

    sampler._apply_processors = timed_apply  # type: ignore[method-assign]

    def run(constrained: bool) -> tuple[float, int, int]:
        start = time.perf_counter()
        outputs = llm.generate(prompts, params(constrained), use_tqdm=False)
        seconds = time.perf_counter() - start
        num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        valid = 0
        if constrained:
            for o in outputs[0::2]:
                try:
                    json.loads(o.outputs[0].text)
                    valid += o.outputs[0].finish_reason == "stop"
                except json.JSONDecodeError:
                    pass
        return num_tokens / seconds, num_tokens, valid

    run(True)  # warm-up: grammars compiled, the fused mask kernel ready, the model's kernels warm
    grammar_times.clear()
    from tokenmill.structured_output.bitmask import _COMPILED

    buffer = sampler.bitmask
    assert buffer is not None
    fill_times: list[float] = []
    apply_times: list[float] = []
    fill, apply = buffer.fill, buffer.apply

    def timed_fill(processors):
        start = time.perf_counter()
        rows = fill(processors)
        fill_times.append(time.perf_counter() - start)
        return rows

    def timed_buffer_apply(logits, rows):
        start = time.perf_counter()
        apply(logits, rows)
        apply_times.append(time.perf_counter() - start)

    buffer.fill = timed_fill  # type: ignore[method-assign]
    buffer.apply = timed_buffer_apply  # type: ignore[method-assign]
    rows = {"constrained": [], "none": []}
    for _ in range(args.rounds):
        rows["constrained"].append(run(True))
        rows["none"].append(run(False))
    best = {k: max(r[0] for r in v) for k, v in rows.items()}
    results.update(
        tok_s_constrained=best["constrained"], tok_s_none=best["none"], ratio=best["constrained"] / best["none"],
        tokens_constrained=rows["constrained"][-1][1], tokens_none=rows["none"][-1][1],
        valid_stopped=rows["constrained"][-1][2], num_constrained=args.num_requests // 2,
        grammar_ms_per_step_mean=statistics.mean(grammar_times) * 1e3,
        grammar_ms_per_step_p90=statistics.quantiles(grammar_times, n=10)[-1] * 1e3,
        num_steps_with_grammars=len(grammar_times),
        fill_ms_per_step_mean=statistics.mean(fill_times) * 1e3,
        apply_ms_per_step_mean=statistics.mean(apply_times) * 1e3,
        fused_apply_kernel=_COMPILED.failed or "ready" if _COMPILED._ready else "not compiled",
    )
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
