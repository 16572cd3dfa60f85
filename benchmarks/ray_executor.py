"""The control plane of tensor parallelism over Ray actors against worker processes on pipes: the same TP=2 engine
with --distributed-executor-backend mp and ray, side by side in one run, on a tiny random-weight Llama (so the
model's own time is small and the cost of reaching the workers shows).

    python benchmarks/ray_executor.py                        # batch 8, 64 decode steps, 3 alternating rounds
    python benchmarks/ray_executor.py --batch 32 --rounds 5 --json out.json

Per engine step (EngineCore's step timing, medians over the decode steps of a round): `step` the whole call,
`runner` the output rank's own work (batch building, forward, logits, sampling), and `control` what is left
once the scheduler's work is also taken out: sending the step to every rank and bringing the answer back (the
pipe and msgpack for mp; an actor method call per rank and Ray's object transfer for ray), plus waiting for the
slower rank. Ray runs on a local cluster the engine starts (RAY_ADDRESS unset), one CPU per actor, as mp's two
processes get one thread each on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill import LLM, SamplingParams  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="requests decoded together")
    p.add_argument("--steps", type=int, default=64, help="decode steps per round (max_tokens)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per backend, alternating")
    p.add_argument("--backends", default="mp,ray")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def build_model(root: Path) -> Path:
    from tests.tiny_models import build_tiny_model, build_tokenizer

    build_tokenizer(root / "tokenizer")
    return build_tiny_model("llama", root / "llama", root / "tokenizer")


def run_round(llm: LLM, batch: int, steps: int) -> dict[str, float]:
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    prompts = [[5 + i, 6 + i, 7 + i, 8 + i] for i in range(batch)]
    engine.set_step_timing(True)
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    timings = [t for t in engine.take_step_timings() if t.num_collected and t.num_scheduled_tokens == batch]
    engine.set_step_timing(False)

    def ms(values: list[float]) -> float:
        return round(statistics.median(values) * 1e3, 3)

    runner = [t.build_batch + t.forward + t.logits + t.sample for t in timings]
    return {
        "decode_steps": len(timings), "wall_s": round(wall, 3),
        "step_ms": ms([t.step for t in timings]), "runner_ms": ms(runner),
        "control_ms": ms([t.step - r - t.schedule - t.update for t, r in zip(timings, runner, strict=True)]),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.setdefault("TOKENMILL_RAY_PER_WORKER_CPUS", "1")
    backends = args.backends.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(build_model(Path(tmp)))
        engines = {b: LLM(model_dir, tensor_parallel_size=2, distributed_executor_backend=b, dtype="float32",
                          device="cpu", max_model_len=256, show_progress=False) for b in backends}
        try:
            for llm in engines.values():  # warm-up
                llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
            results: dict[str, list[dict[str, float]]] = {b: [] for b in backends}
            for _ in range(args.rounds):
                for b, llm in engines.items():
                    results[b].append(run_round(llm, args.batch, args.steps))
        finally:
            for llm in engines.values():
                llm.llm_engine.shutdown()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, batch {args.batch}, "
          f"{args.steps} decode steps per round, TP=2")
    print("| backend | round | step ms | runner ms | control ms | decode steps |")
    print("| --- | --- | --- | --- | --- | --- |")
    for b in backends:
        for i, r in enumerate(results[b]):
            print(f"| {b} | {i + 1} | {r['step_ms']} | {r['runner_ms']} | {r['control_ms']} | {r['decode_steps']} |")
    if len(backends) == 2:
        a, b = backends
        for key in ("step_ms", "control_ms"):
            ratio = statistics.median(r[key] for r in results[b]) / statistics.median(r[key] for r in results[a])
            print(f"{b}/{a} {key}: {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
