"""Two engines in one process, stepped in turn: throughput side by side when the machine's speed drifts.

    python benchmarks/interleaved.py                      # bundled model: bf16 weights vs Q4_1 kept packed
    python benchmarks/interleaved.py --concurrency 64 --num-prompts 64 --json out.json
    python benchmarks/interleaved.py --model DIR --quantization int4   # DIR unquantized vs quantized at load

On a shared VM the speed of the CPU can halve for a minute and come back (stolen time), so two engines run one
after the other (benchmarks/peers/run.py) can differ by that much for no reason of their own. Here both engines
are loaded in one process and get the same requests (peers' dataset: seeded random prompts, exactly each
request's output length, greedy, end-of-sequence ignored, all arriving at once, at most `--concurrency` in flight).
The loop then gives each engine one `LLMEngine.step()` in turn (which goes first alternates), so a slow minute
lands on both. Each engine's clock is the sum of its own steps' times: its output tok/s is its output tokens over
that clock, TTFT a request's first token on that clock.

The two engines run the same schedule (the same requests, the scheduler and KV cache sized alike: step i holds the
same requests in both), so step i of one is compared with step i of the other, measured a fraction of a second
apart: the median of those per-step ratios is the figure least moved by the machine. The steps are also summed by
kind (steps with prompt tokens; decode-only steps by their number of sequences), which shows where in a run one
engine gains or loses. Both engines' weights share
the caches, as they never do in separate runs (a step of one evicts the other's weights from the last-level
cache).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenmill import LLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# tokenmill before torch: it sets the OpenMP wait policy a shared CPU needs.
import tokenmill  # noqa: E402, F401


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="model directory: engine A runs it unquantized (--dtype), engine B with --quantization "
                        "(default: the bundled model, A its weights dequantized to bf16, B its Q4_1 kept packed)")
    p.add_argument("--quantization", default="int4", help="engine B's --quantization with --model (default int4)")
    p.add_argument("--dtype", default="bfloat16", help="engine A's dtype (engine B: auto) (default bfloat16)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--concurrency", type=int, default=64, help="most requests in flight in each engine")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", default="32-512", help="prompt tokens, MIN-MAX drawn uniformly")
    p.add_argument("--output-len", default="32-256", help="output tokens, MIN-MAX drawn uniformly")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", dest="json_path", default=None, help="write the results to this JSON file")
    return p.parse_args(argv)


@dataclass
class Lane:
    """One engine, its requests, and its own clock (the sum of its steps' times)."""

    label: str
    detail: str
    llm: LLM
    pending: deque[int]
    concurrency: int
    in_flight: dict[str, int] = field(default_factory=dict)  # request id -> index into the requests
    clock_s: float = 0.0
    step_s: list[float] = field(default_factory=list)
    step_requests: list[tuple[str, ...]] = field(default_factory=list)  # each step's requests (as indices)
    step_tokens: list[int] = field(default_factory=list)  # each step's scheduled tokens (prompt and decode)
    first_token_s: dict[int, float] = field(default_factory=dict)
    done_s: dict[int, float] = field(default_factory=dict)
    output_tokens: dict[int, int] = field(default_factory=dict)

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.in_flight)

    def step(self, requests: list) -> None:
        from tokenmill import RequestOutput, SamplingParams

        engine = self.llm.llm_engine
        while self.pending and len(self.in_flight) < self.concurrency:
            index = self.pending.popleft()
            request = requests[index]
            request_id = engine.next_request_id()
            params = SamplingParams(max_tokens=request.expected_output_len, ignore_eos=True, temperature=0.0)
            engine.add_request(request_id, {"prompt_token_ids": request.prompt_token_ids}, params)
            self.in_flight[request_id] = index
        start = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - start
        self.clock_s += elapsed
        self.step_s.append(elapsed)
        self.step_requests.append(tuple(sorted(str(self.in_flight[o.request_id]) for o in outputs
                                               if o.request_id in self.in_flight)))
        self.step_tokens.append(sum(t.num_scheduled_tokens for t in engine.take_step_timings()))
        for output in outputs:
            done = self.in_flight.get(output.request_id)
            if done is None or not isinstance(output, RequestOutput):
                continue
            token_ids = output.outputs[0].token_ids
            if token_ids and done not in self.first_token_s:
                self.first_token_s[done] = self.clock_s
            if output.finished:
                del self.in_flight[output.request_id]
                self.done_s[done] = self.clock_s
                self.output_tokens[done] = len(token_ids)

    def summary(self) -> dict:
        tokens = sum(self.output_tokens.values())
        return {
            "label": self.label,
            "detail": self.detail,
            "steps": len(self.step_s),
            "busy_s": round(self.clock_s, 6),
            "output_tokens": tokens,
            "output_tok_s": round(tokens / self.clock_s, 2) if self.clock_s > 0 else None,
            "mean_ttft_ms": round(1e3 * statistics.fmean(self.first_token_s.values()), 1),
            "step_ms": [round(1e3 * t, 3) for t in self.step_s],
            "step_outputs": [len(r) for r in self.step_requests],
            "step_tokens": self.step_tokens,
        }


def build_lanes(args: argparse.Namespace) -> tuple[list[Lane], Path]:
    import torch

    from tokenmill import LLM

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    common = {"max_model_len": args.max_model_len, "max_num_seqs": args.concurrency, "show_progress": False}
    if args.model is None:
        from benchmarks.peers.models import hf_model_dir, quantized_model_dir

        plain_dir, quant_dir = hf_model_dir(), quantized_model_dir()
        plain = LLM(str(plain_dir), dtype=args.dtype, **common)
        quant = LLM(str(quant_dir), dtype="auto", **common)
        labels = (f"{args.dtype}", "q4_1")
        details = (f"the bundled model's weights dequantized to {args.dtype}", "Q4_1 weights kept packed (GGUF)")
    else:
        plain_dir = Path(args.model)
        plain = LLM(str(plain_dir), dtype=args.dtype, **common)
        quant = LLM(str(plain_dir), dtype="auto", quantization=args.quantization, **common)
        labels = (f"{args.dtype}", args.quantization)
        details = (f"{plain_dir.name} in {args.dtype}", f"{plain_dir.name} with --quantization {args.quantization}")
    lanes = [Lane(label, detail, llm, deque(), args.concurrency)
             for label, detail, llm in zip(labels, details, (plain, quant), strict=True)]
    return lanes, plain_dir


def warm_up(lanes: list[Lane], requests: list) -> None:
    """A few steps of one short request in each engine (kernels built, oneDNN's primitives created), then the
    prefix caches emptied so that the run starts cold in both."""
    from tokenmill import SamplingParams
    from tokenmill.benchmarks.throughput import reset_prefix_cache

    params = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0)
    for lane in lanes:
        lane.llm.generate([{"prompt_token_ids": requests[0].prompt_token_ids}], params, use_tqdm=False)
        reset_prefix_cache(lane.llm)


def run(lanes: list[Lane], requests: list) -> None:
    for lane in lanes:
        lane.pending.extend(range(len(requests)))
        lane.llm.llm_engine.set_step_timing(True)  # each step's scheduled tokens (Lane.step_tokens)
        lane.llm.llm_engine.take_step_timings()
    turn = 0
    start = time.perf_counter()
    while any(lane.busy for lane in lanes):
        order = lanes if turn % 2 == 0 else lanes[::-1]
        for lane in order:
            if lane.busy:
                lane.step(requests)
        turn += 1
        if turn % 50 == 0:
            done = ", ".join(f"{lane.label} {len(lane.done_s)}/{len(requests)}" for lane in lanes)
            print(f"  step {turn}: {done} requests done, {time.perf_counter() - start:.0f} s", flush=True)


def step_kinds(concurrency: int) -> list[tuple[str, int, int]]:
    """The kinds of step compared: steps with prompt tokens (prefill chunks, with or without decodes), then
    decode-only steps by their number of sequences: 1-8 (the few left at the end of a run), up to half the
    concurrency, the rest below it, and full steps (every slot decoding)."""
    edges = sorted({1, 9, concurrency // 2 + 1, concurrency, concurrency + 1})
    return [("prefill", 0, 0)] + [("decode", lo, hi - 1) for lo, hi in zip(edges, edges[1:], strict=False) if lo < hi]


def by_step_kind(a: Lane, b: Lane, same: list[int]) -> list[dict]:
    """The matching steps by kind (step_kinds): each kind's share of A's clock and the ratio of the two engines'
    summed times over it (A's over B's: above 1 where B is faster). A step is decode-only when it scheduled one
    token for each sequence it returned output for."""
    kinds = []
    for kind, lo, hi in step_kinds(a.concurrency):
        if kind == "prefill":
            steps = [i for i in same if a.step_tokens[i] > len(a.step_requests[i])]
        else:
            steps = [i for i in same if a.step_tokens[i] == len(a.step_requests[i]) and lo <= a.step_tokens[i] <= hi]
        a_s, b_s = sum(a.step_s[i] for i in steps), sum(b.step_s[i] for i in steps)
        if steps and b_s > 0:
            kinds.append({"kind": kind if kind == "prefill" else f"decode {lo}-{hi}" if lo < hi else f"decode {lo}",
                          "steps": len(steps), "share_of_a": round(a_s / a.clock_s, 4), "ratio": round(a_s / b_s, 4)})
    return kinds


def compare(a: Lane, b: Lane) -> dict:
    """B against A: throughput over the engines' own clocks, and step by step where the steps match."""
    same = [i for i in range(min(len(a.step_s), len(b.step_s))) if a.step_requests[i] == b.step_requests[i]]
    per_step = [a.step_s[i] / b.step_s[i] for i in same if b.step_s[i] > 0]
    return {
        "throughput_ratio": round(a.clock_s / b.clock_s * (sum(b.output_tokens.values())
                                                           / max(1, sum(a.output_tokens.values()))), 4),
        "matching_steps": len(same),
        "steps": [len(a.step_s), len(b.step_s)],
        "median_step_ratio": round(statistics.median(per_step), 4) if per_step else None,
        "step_ratio_quartiles": [round(q, 4) for q in statistics.quantiles(per_step, n=4)]
        if len(per_step) >= 4 else None,
        "by_step_kind": by_step_kind(a, b, same),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from tokenmill.benchmarks.datasets import parse_range, random_requests
    from tokenmill.model.tokenizer import Tokenizer

    lanes, model_dir = build_lanes(args)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    requests = random_requests(tokenizer, args.num_prompts, parse_range(args.input_len),
                               parse_range(args.output_len), seed=args.seed)
    warm_up(lanes, requests)
    print(f"{args.num_prompts} requests, at most {args.concurrency} in flight, {lanes[0].label} and "
          f"{lanes[1].label} stepped in turn", flush=True)
    started = time.time()
    run(lanes, requests)
    wall_s = time.time() - started
    a, b = lanes
    ratio = compare(a, b)
    result = {
        "benchmark": "interleaved",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "command": "python benchmarks/interleaved.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "wall_s": round(wall_s, 1),
        "engines": [a.summary(), b.summary()],
        "b_over_a": ratio,
    }
    print()
    print("| engine | steps | own clock s | output tok/s | mean TTFT ms (own clock) |")
    print("|---|---:|---:|---:|---:|")
    for lane in lanes:
        s = lane.summary()
        print(f"| {s['detail']} | {s['steps']} | {s['busy_s']:.1f} | {s['output_tok_s']:.1f} | "
              f"{s['mean_ttft_ms']:.0f} |")
    print(f"\n{b.label} / {a.label}: output tok/s {ratio['throughput_ratio']:.3f}; step by step (median of "
          f"{ratio['matching_steps']} matching steps, A's time over B's) {ratio['median_step_ratio']}, "
          f"quartiles {ratio['step_ratio_quartiles']}; {wall_s:.0f} s wall")
    print(f"By kind of step ({a.label}'s time over {b.label}'s, summed over the steps of the kind): " + "; ".join(
        f"{kind['kind']}: {kind['ratio']:.3f} ({kind['steps']} steps, {100 * kind['share_of_a']:.0f}% of "
        f"{a.label}'s clock)" for kind in ratio["by_step_kind"]))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"Results written to {args.json_path}")
    return result


if __name__ == "__main__":
    main()
