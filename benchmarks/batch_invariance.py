"""Batch-invariant mode: what it buys (outputs that do not change with the batch) and what it costs (speed).

    python benchmarks/batch_invariance.py                  # bundled SmolLM2-135M-Instruct, the CPU default dtype
    python benchmarks/batch_invariance.py --rounds 3 --json invariance.json

Two engines in one process, the default one and one with batch_invariant=True, same model, same dtype. For each:

- invariance: 8 target requests (4 greedy, 4 seeded at temperature 0.8), 32 tokens each, are run alone, then
  inside a batch of 24 other requests (random prompts of 8-256 tokens, mixed sampling settings), in a random
  order; a target whose tokens differ from its run alone counts as a change;
- cost: output tokens per second of that batch of 32 requests (the whole `generate` call), and the
  latency of one 32-token request alone.

The engines alternate round by round, so the machine's load falls on both.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import tokenmill  # noqa: F401  (before torch: it sets the OpenMP defaults, see tokenmill/worker/cpu_threads.py)


def make_workload(vocab: int, seed: int):
    from tokenmill import SamplingParams

    rng = random.Random(seed)

    def prompt(lo: int, hi: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(rng.randrange(lo, hi))]

    targets = [(prompt(16, 200), SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)) for _ in range(4)]
    targets += [(prompt(16, 200), SamplingParams(temperature=0.8, seed=i, max_tokens=32, ignore_eos=True))
                for i in range(4)]
    mates = []
    for _ in range(24):
        kind = rng.random()
        params = (SamplingParams(temperature=0, max_tokens=32, ignore_eos=True) if kind < 0.5 else
                  SamplingParams(temperature=0.9, top_p=0.95, max_tokens=32, ignore_eos=True))
        mates.append((prompt(8, 256), params))
    return targets, mates, rng


def run_round(llm, targets, mates, rng) -> dict:
    alone = []
    latencies = []
    for p, sp in targets:
        start = time.perf_counter()
        alone.append(llm.generate([{"prompt_token_ids": p}], [sp], use_tqdm=False)[0].outputs[0].token_ids)
        latencies.append(time.perf_counter() - start)
    batch = [(i, p, sp) for i, (p, sp) in enumerate(targets)] + [(None, p, sp) for p, sp in mates]
    rng.shuffle(batch)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for _, p, _ in batch], [sp for _, _, sp in batch], use_tqdm=False)
    seconds = time.perf_counter() - start
    changed = sum(1 for (i, _, _), o in zip(batch, outs, strict=True)
                  if i is not None and o.outputs[0].token_ids != alone[i])
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"changed": changed, "compared": len(targets), "throughput_tok_s": tokens / seconds,
            "latency_alone_s": statistics.median(latencies)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF directory or .gguf (default: the bundled model)")
    parser.add_argument("--dtype", default="auto", help="both engines' dtype (default: bf16 where the CPU has it)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kv-cache-memory", default="512MiB")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import torch

    from tokenmill import LLM

    engines = {
        "default": LLM(args.model, dtype=args.dtype, kv_cache_memory=args.kv_cache_memory, show_progress=False,
                       batch_invariant=False),
        "batch_invariant": LLM(args.model, dtype=args.dtype, kv_cache_memory=args.kv_cache_memory,
                               show_progress=False, batch_invariant=True),
    }
    vocab = engines["default"].get_tokenizer().vocab_size
    dtype = engines["default"].llm_engine.dtype
    results: dict[str, list[dict]] = {name: [] for name in engines}
    for r in range(args.rounds):
        for name, llm in engines.items():
            targets, mates, rng = make_workload(vocab, seed=r)
            results[name].append(run_round(llm, targets, mates, rng))
    print(f"{dtype}, {torch.get_num_threads()} threads, {args.rounds} rounds of 8 targets in a batch of 32")
    print(f"{'engine':16s} {'outputs changed by the batch':>30s} {'batch tok/s (median)':>22s} "
          f"{'one request alone, s':>22s}")
    for name, rounds in results.items():
        changed = sum(x["changed"] for x in rounds)
        compared = sum(x["compared"] for x in rounds)
        tput = statistics.median(x["throughput_tok_s"] for x in rounds)
        lat = statistics.median(x["latency_alone_s"] for x in rounds)
        print(f"{name:16s} {f'{changed} of {compared}':>30s} {tput:22.1f} {lat:22.2f}")
    ratio = (statistics.median(x["throughput_tok_s"] for x in results["batch_invariant"])
             / statistics.median(x["throughput_tok_s"] for x in results["default"]))
    print(f"batch-invariant throughput: {ratio:.2f}x the default")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dtype": str(dtype), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
