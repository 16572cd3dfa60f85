"""Pipeline parallelism on this machine: PP=1 against PP=2, side by side in one run, and how much the stages overlap.

    python benchmarks/pipeline_parallel.py                      # the bundled SmolLM2-135M-Instruct, 32 requests
    python benchmarks/pipeline_parallel.py --scheduling async --num-prompts 64 --json pp.json

Both engines run in worker processes (distributed_executor_backend="mp", so both pay the same process boundary):
PP=1 is one worker with every usable CPU, PP=2 two workers (the decoder layers split by
planner.pipeline_stage_layers) sharing the CPUs (each rank takes its share of the cores). The same seeded
requests (random token prompts, greedy, end-of-sequence ignored) are queued at once and run to the end.

Reported per engine:
- output tok/s: output tokens / wall seconds of the whole run (prefill included), and its ratio to PP=1 under
  the same scheduling (synchronous steps, and async scheduling: step N+1 launched before N is collected);
- per stage: busy fraction = the seconds the stage spent on steps without waiting for another stage
  (Worker.engine_facts' pipeline_busy_seconds, over the run) / the run's wall seconds;
- overlap = the stages' busy seconds added up / wall seconds: 1.0 when the stages took turns (no overlap), up to
  the number of stages when they all worked all the time. Each step is cut into one microbatch per stage: with
  synchronous steps the pipeline fills and drains within every step, so M stages overlap M * M / (2M - 1) at
  best (1.33 at PP=2); with async scheduling the next step's first microbatch enters as soon as this step's is
  sampled, and the bound is M.

On a CPU the stages share one memory system and, here, a few cores: PP=2 cannot be faster than PP=1, which already
uses every core for each matmul. What the numbers measure is the overlap, the part that carries over to stages on
separate GPUs or nodes, where each stage has its own device and the step time approaches one stage's share.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tokenmill, not an installed one


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default=None, help="HF model directory or .gguf (default: the bundled model)")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens of every request")
    parser.add_argument("--output-len", type=int, default=64, help="output tokens of every request")
    parser.add_argument("--pipeline-parallel-sizes", default="1,2", help="comma-separated sizes to compare")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--kv-cache-memory", default="256MiB", help="KV cache budget of each rank")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--scheduling", default="both", choices=["sync", "async", "both"],
                        help="synchronous steps, async scheduling (step N+1 launched before N is collected), or both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here")
    return parser.parse_args(argv)


def make_requests(args: argparse.Namespace, vocab_size: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(args.seed)
    return [torch.randint(10, vocab_size, (args.input_len,), generator=g).tolist() for _ in range(args.num_prompts)]


def run_engine(model_dir: Path, args: argparse.Namespace, pipeline_parallel_size: int, async_scheduling: bool
               ) -> dict:
    from tokenmill.config import EngineConfig
    from tokenmill.engine.engine_core import EngineCore
    from tokenmill.request import Request
    from tokenmill.sampling_params import SamplingParams

    config = EngineConfig.from_kwargs(
        str(model_dir), dtype=args.dtype, device="cpu", kv_cache_memory=args.kv_cache_memory,
        max_num_batched_tokens=args.max_num_batched_tokens, async_scheduling=async_scheduling,
        pipeline_parallel_size=pipeline_parallel_size, distributed_executor_backend="mp",
    )
    core = EngineCore(config, model_dir, show_progress=False)
    try:
        prompts = make_requests(args, core.spec.vocab_size)
        params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
        before = core.engine_info().get("ranks")
        num_steps = core.num_steps
        start = time.perf_counter()
        for i, prompt in enumerate(prompts):
            core.add_request(Request(f"r{i}", prompt, params, frozenset()))
        num_tokens = 0
        while core.has_unfinished_requests():
            for out in core.step():
                num_tokens += len(out.new_token_ids)
        wall = time.perf_counter() - start
        info = core.engine_info()
        result = {
            "pipeline_parallel_size": pipeline_parallel_size, "async_scheduling": async_scheduling, "wall_s": wall,
            "output_tokens": num_tokens,
            "output_tok_s": num_tokens / wall, "num_steps": core.num_steps - num_steps,
            "step_ms": 1e3 * wall / max(1, core.num_steps - num_steps), "dtype": info["dtype"],
        }
        if pipeline_parallel_size > 1:
            stages = []
            for b, a in zip(before, info["ranks"], strict=True):
                busy = a["pipeline_busy_seconds"] - b["pipeline_busy_seconds"]
                stages.append({"rank": a["rank"], "layers": a["layers"], "busy_s": busy, "busy_fraction": busy / wall,
                               "kv_cache_bytes": a["kv_cache_bytes"]})
            result["stages"] = stages
            result["overlap"] = sum(s["busy_s"] for s in stages) / wall
        return result
    finally:
        core.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tokenmill.model.default_model import prepare_model

    model_dir = prepare_model(args.model)
    sizes = [int(s) for s in args.pipeline_parallel_sizes.split(",")]
    schedules = {"sync": [False], "async": [True], "both": [False, True]}[args.scheduling]
    results = [run_engine(model_dir, args, pp, a) for a in schedules for pp in sizes]
    print(f"model {model_dir.name}, {args.num_prompts} requests x ({args.input_len} prompt + {args.output_len} "
          f"output) tokens, {results[0]['dtype']}, {platform.processor() or platform.machine()}")
    print(f"{'schedule':>8} {'PP':>3} {'tok/s':>8} {'ratio':>6} {'steps':>6} {'ms/step':>8} {'overlap':>8}  "
          "stage busy fractions")
    for r in results:
        base = next(b for b in results if b["async_scheduling"] == r["async_scheduling"])["output_tok_s"]
        stages = "  ".join(f"{s['layers']}: {s['busy_fraction']:.2f}" for s in r.get("stages", []))
        overlap = f"{r['overlap']:.2f}" if "overlap" in r else "-"
        schedule = "async" if r["async_scheduling"] else "sync"
        print(f"{schedule:>8} {r['pipeline_parallel_size']:>3} {r['output_tok_s']:>8.1f} "
              f"{r['output_tok_s'] / base:>6.2f} {r['num_steps']:>6} {r['step_ms']:>8.1f} {overlap:>8}  {stages}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
