"""Tensor parallelism side by side: output tokens per second at TP=1 and at TP=N in one run, and the time the
ranks spend in collectives per decode step (all-reduces after o_proj and down_proj, the embedding's
all-reduce, the logits' gather and the sampled tokens' broadcast), read from the output rank's step timing.

    python benchmarks/tensor_parallel.py                         # the bundled SmolLM2-135M: TP=1 vs TP=3
    python benchmarks/tensor_parallel.py --batches 1,16 --max-tokens 32
    python benchmarks/tensor_parallel.py --random-model qwen2.5-0.5b --tp-sizes 1,2 --device cuda  # 2+ GPUs

The bundled model has 9 query / 3 KV heads, so its only tensor-parallel size above 1 is 3 (2 does not divide
the heads); --tp-sizes defaults to 1 and the smallest valid size above 1. On a CPU the ranks share the same
cores (each gets cpu_count / N threads), so TP cannot be faster there: the point is the ratio and the cost of
the collectives, which on a GPU node become NCCL all-reduces over NVLink.
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory or .gguf (default: the bundled SmolLM2-135M)")
    p.add_argument("--random-model", default=None,
                   help="a random-weight model of a benchmarks/gpu/models.py shape instead (e.g. qwen2.5-0.5b)")
    p.add_argument("--models-dir", default=str(Path(tempfile.gettempdir()) / "tokenmill-bench-models"))
    p.add_argument("--tp-sizes", default="auto", help="comma-separated sizes, or auto: 1 and the smallest valid > 1")
    p.add_argument("--batches", default="1,16", help="comma-separated numbers of concurrent requests")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens of each request")
    p.add_argument("--max-tokens", type=int, default=32, help="output tokens of each request")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--kv-cache-memory", default="256MiB", help="per rank (CPU)")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def model_path(args: argparse.Namespace) -> Path:
    if args.random_model:
        from benchmarks.gpu.models import build_random_model

        device = "cuda" if args.device in ("auto", "cuda") and _cuda() else "cpu"
        return build_random_model(args.random_model, Path(args.models_dir), device=device)
    from tokenmill.model.default_model import prepare_model

    return prepare_model(args.model)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def tp_sizes(args: argparse.Namespace, path: Path) -> list[int]:
    if args.tp_sizes != "auto":
        return [int(s) for s in args.tp_sizes.split(",")]
    from tokenmill.model.loader import read_hf_config
    from tokenmill.planner import ModelArch
    from tokenmill.planner.memory import valid_tensor_parallel_sizes

    config = read_hf_config(path)
    valid = [t for t in valid_tensor_parallel_sizes(ModelArch.from_hf_config(config), 8)
             if t > 1 and config["intermediate_size"] % t == 0]
    if not valid:
        raise SystemExit(f"{path}: no tensor-parallel size above 1 splits this model")
    return [1, valid[0]]


def measure(llm, batch: int, args: argparse.Namespace) -> dict:
    """Generate `batch` requests together (greedy, ignore_eos) with step timing on: output tok/s over the whole
    generate call, and the medians of the decode steps (every request decoding) and their collectives."""
    import random

    from tokenmill import SamplingParams

    engine = llm.llm_engine
    rng = random.Random(batch)
    prompts = [{"prompt_token_ids": [rng.randrange(100, engine.vocab_size) for _ in range(args.prompt_len)]}
               for _ in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    engine.set_step_timing(True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    timings = engine.take_step_timings()
    engine.set_step_timing(False)
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    decode = [t for t in timings if t.num_scheduled_tokens == batch and t.num_collected]
    step_ms = statistics.median(t.step for t in decode) * 1e3 if decode else float("nan")
    coll_ms = statistics.median(t.collectives for t in decode) * 1e3 if decode else float("nan")
    return {"batch": batch, "output_tokens": num_tokens, "seconds": seconds, "tok_s": num_tokens / seconds,
            "decode_step_ms": step_ms, "collectives_ms_per_step": coll_ms, "num_decode_steps": len(decode),
            "first_tokens": [o.outputs[0].token_ids[:8] for o in outputs[:2]]}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from tokenmill import LLM

    path = model_path(args)
    sizes = tp_sizes(args, path)
    batches = [int(b) for b in args.batches.split(",")]
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                     "date": time.strftime("%Y-%m-%d"), "model": str(args.random_model or args.model or "bundled"),
                     "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "runs": []}
    for tp in sizes:
        kwargs = {"kv_cache_memory": args.kv_cache_memory} if args.device != "cuda" and not (
            args.device == "auto" and _cuda()) else {}
        start = time.perf_counter()
        llm = LLM(str(path), tensor_parallel_size=tp, dtype=args.dtype, device=args.device,
                  max_model_len=args.prompt_len + args.max_tokens + 16, max_num_seqs=max(batches),
                  show_progress=False, **kwargs)
        start_s = time.perf_counter() - start
        try:
            info = llm.llm_engine.engine_info()
            for batch in batches:
                run = measure(llm, batch, args)
                run.update(tp=tp, start_seconds=start_s, dtype=info["dtype"], device=info["device"])
                results["runs"].append(run)
                print(f"tp={tp} batch={batch}: {run['tok_s']:.1f} tok/s, decode step {run['decode_step_ms']:.1f} ms, "
                      f"collectives {run['collectives_ms_per_step']:.2f} ms/step", flush=True)
        finally:
            llm.llm_engine.shutdown()
    base = {r["batch"]: r for r in results["runs"] if r["tp"] == sizes[0]}
    for r in results["runs"]:
        r["tok_s_ratio"] = r["tok_s"] / base[r["batch"]]["tok_s"]
        r["same_tokens_as_tp1"] = r["first_tokens"] == base[r["batch"]]["first_tokens"]
    print(f"\n{results['model']} on {results['machine']}, {args.prompt_len}-token prompts, {args.max_tokens} output "
          f"tokens each")
    print("| TP | batch | output tok/s | ratio vs TP=1 | decode step (ms) | collectives (ms/step) | share |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["runs"]:
        share = r["collectives_ms_per_step"] / r["decode_step_ms"] if r["tp"] > 1 else 0.0
        print(f"| {r['tp']} | {r['batch']} | {r['tok_s']:.1f} | {r['tok_s_ratio']:.2f} | {r['decode_step_ms']:.1f} | "
              f"{r['collectives_ms_per_step']:.2f} | {share:.0%} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
