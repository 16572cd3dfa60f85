"""Host-side cost of an engine step at a large decode batch: everything a step does besides the model's math.

On a GPU the forward and the logits run on the device; what remains of a step's wall time (scheduling, batch
building, sampling bookkeeping, stop checks, detokenizing, building outputs) is time the GPU waits for the
host. This measures that remainder on any machine with a tiny random-weight model, whose forward is cheap,
so the host work stands out; the stages are the ones `benchmarks/gpu/run.sh` reports on a GPU.

    python benchmarks/host_overhead.py                  # batch 256, 512-token contexts, 40 decode steps
    python benchmarks/host_overhead.py --batch 64 --json out.json

Three ways of running steps are measured in the same run: `stream` (every request's output after every step,
as the server's engine loop does), `final` (only finished requests' outputs, as `LLM.generate`) and `async`
(`final` with async scheduling: on a CPU nothing overlaps, so this shows what the async path costs the host;
on a GPU that work runs while the device computes the next step).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu.engine_hooks import StepTimers  # noqa: E402
from benchmarks.gpu.models import build_random_model  # noqa: E402

MODES = ("stream", "final", "async")
STAGES = ("schedule", "build_batch", "update", "output_processing")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256, help="concurrent decoding requests")
    p.add_argument("--context", type=int, default=512, help="prompt tokens of each request")
    p.add_argument("--steps", type=int, default=40, help="measured decode steps per mode")
    p.add_argument("--model", default="tiny-llama", help="a shape of benchmarks/gpu/models.py")
    p.add_argument("--models-dir", default=str(Path(tempfile.gettempdir()) / "tokenmill-bench-models"))
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, of: " + ", ".join(MODES))
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def start_batch(llm, batch: int, context: int) -> list:
    """`batch` requests of random prompts, stepped until every one decodes; returns their parents. None of
    them can finish before max_model_len."""
    from tokenmill import SamplingParams

    engine = llm.llm_engine
    rng = random.Random(batch)
    params = SamplingParams(max_tokens=engine.max_model_len - context, ignore_eos=True, temperature=0)
    parents = [engine.add_request(engine.next_request_id(),
                                  {"prompt_token_ids": [rng.randrange(engine.vocab_size) for _ in range(context)]},
                                  params) for _ in range(batch)]
    children = [c for p in parents for c in p.children]
    while not all(c.output_token_ids for c in children):  # every prompt computed: each has sampled a token
        engine.step()
    for _ in range(2):
        engine.step()
    return parents


def measure(llm, args: argparse.Namespace, mode: str) -> dict:
    engine = llm.llm_engine
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: choose from {', '.join(MODES)}")
    if mode == "async":
        engine.set_async_scheduling(True)
    parents = start_batch(llm, args.batch, args.context)
    timers = StepTimers(engine, final_only=mode != "stream")
    with timers:
        for _ in range(args.steps):
            timers.step()
    running = engine.scheduler_stats.num_running
    if running != args.batch:
        raise RuntimeError(f"{running} requests were decoding at the end instead of {args.batch}")
    engine.abort_request([p.request_id for p in parents])
    if mode == "async":
        engine.set_async_scheduling(False)
    summary = timers.summary()  # model_ms: the forward and the logits
    summary["host_us_per_seq"] = summary["cpu_ms"] * 1e3 / args.batch
    return summary


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from tokenmill import LLM

    path = build_random_model(args.model, Path(args.models_dir), device="cpu")
    tokens = max(8192, args.context)
    # Room for the prefill steps (early requests decode meanwhile), the warm-up and the measured steps.
    max_model_len = args.context + -(-args.batch * args.context // tokens) + args.steps + 16
    llm = LLM(str(path), dtype="float32", max_num_seqs=args.batch, max_model_len=max_model_len,
              max_num_batched_tokens=tokens, kv_cache_memory=2**30, show_progress=False)
    results = {"machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
               "batch": args.batch, "context": args.context, "steps": args.steps, "model": args.model,
               "modes": {mode: measure(llm, args, mode) for mode in args.modes.split(",")}}
    print(f"host work of one decode step, batch {args.batch}, {args.context}-token contexts, median of "
          f"{args.steps} steps (ms)")
    header = ["mode", "step", "model", "host", "us/seq", *STAGES]
    print("  ".join(f"{h:>17}" for h in header))
    for mode, r in results["modes"].items():
        row = [mode, r["step_ms"], r["model_ms"], r["cpu_ms"], r["host_us_per_seq"],
               *(r.get(f"{s}_ms", 0.0) for s in STAGES)]
        print("  ".join(f"{v:>17}" if isinstance(v, str) else f"{v:>17.2f}" for v in row))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
