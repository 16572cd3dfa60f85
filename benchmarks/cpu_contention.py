"""Offline generation on a CPU that other processes also use: OpenMP wait policies side by side.

    python benchmarks/cpu_contention.py                   # 1 busy process, 2 rounds x 2 repeats of each
    python benchmarks/cpu_contention.py --hogs 0          # only what else runs on the machine
    python benchmarks/cpu_contention.py --configs "spin=GOMP_SPINCOUNT=300000" "passive="

Each configuration runs in its own process (OpenMP reads its environment once, when torch loads), on the
bundled SmolLM2-135M-Instruct, and measures:

- latency: one 32-token greedy request (`LLM.generate`) on the main thread, and the same in a worker thread;
- throughput: 16 requests of 32 output tokens (random 32-128-token prompts, end-of-sequence ignored), output
  tokens per second of the whole `LLM.generate` call.

The configurations alternate, repeat by repeat, so that a change in the machine's load falls on all of them.
`--hogs N` starts N processes that spin on the CPU for the whole run (the "shared CPU" of a busy machine).

Configurations: "spin" is libgomp's own default (idle worker threads spin 300,000 rounds before they sleep;
GOMP_SPINCOUNT=300000 is the same as leaving it unset), which tokenmill ran with before; "passive" is what
tokenmill now sets when the user has set no OpenMP wait variable (OMP_WAIT_POLICY=PASSIVE: waiting threads
sleep at once).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time

import tokenmill  # noqa: F401  (before torch: it sets the OpenMP defaults, see tokenmill/worker/cpu_threads.py)

DEFAULT_CONFIGS = ["spin=GOMP_SPINCOUNT=300000", "passive="]


def _hog(stop_at: float) -> None:
    while time.time() < stop_at:
        pass


def _measure(repeats: int, kv_cache_memory: str) -> dict:
    """Runs inside one configuration's process."""
    import random
    import threading

    import torch

    from tokenmill import LLM, SamplingParams

    llm = LLM(show_progress=False, kv_cache_memory=kv_cache_memory)
    one = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    rng = random.Random(0)
    vocab = llm.get_tokenizer().vocab_size
    prompts = [[rng.randrange(100, vocab) for _ in range(rng.randrange(32, 129))] for _ in range(16)]
    many = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    llm.generate("Hello", one, use_tqdm=False)  # warm-up: kernels built, pages touched

    def latency() -> float:
        start = time.perf_counter()
        llm.generate("The capital of France is", one, use_tqdm=False)
        return time.perf_counter() - start

    def in_thread() -> float:
        result: list[float] = []
        thread = threading.Thread(target=lambda: result.append(latency()))
        thread.start()
        thread.join()
        return result[0]

    def throughput() -> float:
        start = time.perf_counter()
        outs = llm.generate(prompts, many, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)

    return {
        "main_thread_s": [latency() for _ in range(repeats)],
        "worker_thread_s": [in_thread() for _ in range(repeats)],
        "throughput_tok_s": [throughput() for _ in range(repeats)],
        "torch_threads": torch.get_num_threads(),
        "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "KMP_"))},
    }


def run_config(env_assignments: str, repeats: int, kv_cache_memory: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_WAIT", "GOMP_SPIN", "KMP_BLOCK"))}
    for item in filter(None, env_assignments.split(",")):
        key, _, value = item.partition("=")
        env[key] = value
    cmd = [sys.executable, "-m", "benchmarks.cpu_contention", "--child", "--repeats", str(repeats),
           "--kv-cache-memory", kv_cache_memory]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values):7.2f}  min {min(values):7.2f}  max {max(values):7.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hogs", type=int, default=1, help="busy processes running beside (default 1)")
    parser.add_argument("--repeats", type=int, default=2, help="measurements of each kind per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; each runs every configuration once")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                        help="NAME=VAR=VALUE[,VAR=VALUE] (an empty value list: tokenmill's defaults)")
    parser.add_argument("--kv-cache-memory", default="512MiB")
    parser.add_argument("--json", default=None, help="write the raw numbers here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_measure(args.repeats, args.kv_cache_memory)))
        return 0

    configs = [c.partition("=")[::2] for c in args.configs]
    hogs = []
    if args.hogs:
        stop_at = time.time() + 3600
        hogs = [multiprocessing.Process(target=_hog, args=(stop_at,), daemon=True) for _ in range(args.hogs)]
        for h in hogs:
            h.start()
    results: dict[str, dict[str, list[float]]] = {name: {} for name, _ in configs}
    try:
        for _ in range(args.rounds):
            for name, assignments in configs:
                got = run_config(assignments, args.repeats, args.kv_cache_memory)
                for key, values in got.items():
                    if isinstance(values, list):
                        results[name].setdefault(key, []).extend(values)
                    else:
                        results[name][key] = values
    finally:
        for h in hogs:
            h.terminate()
    print(f"{args.hogs} busy processes beside; {len(os.sched_getaffinity(0))} usable CPUs; "
          f"{args.rounds} rounds x {args.repeats} repeats")
    for name, r in results.items():
        print(f"{name:8s} ({r['omp_env'] or 'libgomp defaults'}, torch threads {r['torch_threads']})")
        print(f"  32-token request, main thread (s)   {summary(r['main_thread_s'])}")
        print(f"  32-token request, worker thread (s) {summary(r['worker_thread_s'])}")
        print(f"  16 x 32 tokens throughput (tok/s)   {summary(r['throughput_tok_s'])}")
    if len(results) >= 2:
        (a, ra), (b, rb) = list(results.items())[:2]
        print(f"{b} / {a}: main-thread latency x{statistics.median(ra['main_thread_s']) / statistics.median(rb['main_thread_s']):.1f} "
              f"faster, throughput x{statistics.median(rb['throughput_tok_s']) / statistics.median(ra['throughput_tok_s']):.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"hogs": args.hogs, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
