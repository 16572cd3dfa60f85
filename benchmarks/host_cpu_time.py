"""Host CPU time of an engine step at a large decode batch, robust to a busy machine.

benchmarks/host_overhead.py measures wall time (step minus the model's time); on a machine shared with other
busy processes, the wait for a CPU lands in that remainder and swamps it. This counts CPU time instead: the
engine thread's thread_time() over a step, minus its thread_time() inside the forward and the logits. Run
with OMP_NUM_THREADS=1 so that the model's math stays on the engine thread, where it is subtracted.

    OMP_NUM_THREADS=1 python benchmarks/host_cpu_time.py --modes stream,final
    OMP_NUM_THREADS=1 python benchmarks/host_cpu_time.py --tree ../main     # another checkout's tokenmill
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--modes", default="stream,final")
    p.add_argument("--models-dir", default=str(Path("/tmp") / "tokenmill-bench-models"))
    p.add_argument("--tree", default=str(Path(__file__).resolve().parents[1]),
                   help="the source tree whose tokenmill (and benchmarks/) to measure")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(args.tree).resolve()))
    from benchmarks.host_overhead import build_random_model, start_batch
    from tokenmill import LLM

    print(f"tokenmill from {Path(sys.modules['tokenmill'].__file__).parent}")
    inside = [0.0]  # thread seconds spent in the forward and the logits during the current step

    def timed(fn):
        def call(*a, **k):
            t0 = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                inside[0] += time.thread_time() - t0
        return call

    path = build_random_model("tiny-llama", Path(args.models_dir), device="cpu")
    for mode in args.modes.split(","):
        llm = LLM(str(path), dtype="float32", max_num_seqs=args.batch, max_model_len=args.context + args.steps + 64,
                  max_num_batched_tokens=max(8192, args.context), kv_cache_memory=2**30, show_progress=False)
        engine = llm.llm_engine
        start_batch(llm, args.batch, args.context)
        runner = engine.core.runner
        runner.forward = timed(runner.forward)
        runner.model.compute_logits = timed(runner.model.compute_logits)
        values = []
        for i in range(args.steps + 3):
            inside[0] = 0.0
            t0 = time.thread_time()
            engine.step(final_only=mode == "final")
            if i >= 3:  # warm-up steps
                values.append((time.thread_time() - t0 - inside[0]) * 1e3)
        print(f"{mode:>6}: host CPU ms per step, batch {args.batch}: median {statistics.median(values):.2f}, "
              f"min {min(values):.2f}")


if __name__ == "__main__":
    main()
