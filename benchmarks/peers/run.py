"""tokenmill and its peers side by side on this CPU, with the machine's ceilings, in one run.

    bash benchmarks/peers/setup.sh                      # once: ctranslate2, llama-cpp-python, the CT2 model
    python benchmarks/peers/run.py --json peers.json    # ~10 minutes on 2 cores with the defaults

Every engine runs SmolLM2-135M-Instruct on the same seeded prompts (token ids), generates exactly each
request's output length (greedy, end-of-sequence ignored) with the same thread count, at concurrency 1
(requests one after another) and at concurrency 64 (64 requests in flight):
- tokenmill: the HF-style directory of the bundled GGUF, in the --engines precision (q4_1: the directory that
  keeps the GGUF's blocks, run by the quantized kernels with activations in --dtype auto's choice, bf16 on a CPU
  with native bf16 and float32 elsewhere; bfloat16: the weights dequantized);
  continuous batching (the `bench throughput` loop, at most C requests in flight).
- transformers: the same directory, AutoModelForCausalLM in the same dtype; concurrency C = batches of C
  requests left-padded to the longest prompt, generated for the batch's longest output; a request counts as
  done when its own last token is out (the extra tokens shorter rows generate are not counted).
- CTranslate2: that directory converted by setup.sh; generate_batch with C prompts at a time, each row stopped
  at its own length by the step callback; compute type int8 and/or float32 (this CPU build has no bf16).
- llama.cpp (llama-cpp-python): the bundled Q4_1 GGUF itself; concurrency C = C sequences decoded together in
  one llama_batch per step (llama.cpp's `batched` example), each leaving at its own length (see LlamaCppRunner
  on llama.cpp's AMX path).
Each engine runs in its own subprocess (so thread pools and memory of one do not disturb the next).

Ceilings, measured in the same run: matmul FLOP/s (bf16 and float32 torch.mm) and memory read bandwidth, over
a large buffer and over a buffer as large as each engine's weights (the bandwidth that engine's roofline uses:
weights that fit the last-level cache stream faster than DRAM). The roofline of a workload is its output
tokens divided by the least time the ceilings allow:
    time >= max(FLOPs / matmul FLOP/s, bytes / bandwidth)
    FLOPs = sum_i 2*P_body*(p_i + o_i) + 2*P_head*o_i + 2*L*d_q*(p_i + o_i)^2   (weights; attention QK, AV)
    bytes = (sum_i o_i / C) * W + sum_i sum_{t=p_i}^{p_i+o_i-1} t * kv_bytes_per_token
with p_i / o_i prompt / output tokens, C the concurrency (each decode step reads the weights W once for up to
C tokens), P_body the decoder-layer parameters, P_head the LM head, L layers, d_q = heads*head_dim. W and the
KV cache bytes follow each engine's precision (Q4_1: the GGUF's size; int8: 1 byte/param; KV: f16 in
llama.cpp, f32 in CTranslate2, the dtype in tokenmill and transformers; tokenmill q4_1 runs in its --dtype auto
choice: bf16 where the CPU has native bf16, else float32). The compute ceiling of the int8 and Q4_1 engines is the
rate of their activations' dtype (CTranslate2: float32 on CPU; an approximation: their integer dot-product
kernels have their own peak).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

DEFAULT_ENGINES = (
    "tokenmill:bfloat16,tokenmill:q4_1,transformers:bfloat16,ctranslate2:int8,ctranslate2:float32,llama.cpp:q4_1"
)
# Output tokens per request kept to compare engines' greedy outputs.
HEAD_TOKENS = 8
# engine precision -> bytes per weight for the roofline (Q4_1 uses the GGUF's size instead)
WEIGHT_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.0, "int16": 2.0}


# ------------------------------------------------------------------------------------------------------------
# The parent: dataset, workers, roofline, table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="tokenmill vs transformers, CTranslate2 and llama.cpp on this CPU",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument(
        "--engines",
        default=DEFAULT_ENGINES,
        help=f"comma-separated ENGINE:PRECISION list (default {DEFAULT_ENGINES})",
    )
    parser.add_argument("--concurrency", default="1,64", help="comma-separated concurrencies (default 1,64)")
    parser.add_argument("--num-prompts", type=int, default=64, help="requests at the highest concurrency")
    parser.add_argument(
        "--num-prompts-c1",
        type=int,
        default=8,
        help="requests at concurrency 1 (the first ones of the same set; one at a time is slow)",
    )
    parser.add_argument("--input-len", default="32-512", help="prompt tokens, MIN-MAX drawn uniformly")
    parser.add_argument("--output-len", default="32-256", help="output tokens, MIN-MAX drawn uniformly")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for every engine")
    parser.add_argument(
        "--model-dir", default=None, help="HF-style model directory (default: the bundled model)"
    )
    parser.add_argument("--gguf", default=None, help="GGUF file for llama.cpp (default: the bundled model)")
    parser.add_argument("--ct2-dir", default=None, help="CTranslate2 model directory (default: setup.sh's)")
    parser.add_argument("--ceiling-size", type=int, default=2048, help="matmul size for the FLOP/s ceiling")
    parser.add_argument("--ceiling-mib", type=int, default=1024, help="buffer MiB for the bandwidth ceiling")
    parser.add_argument(
        "--llama-extra-bufts",
        action="store_true",
        help="let llama.cpp use its AMX / repacked weight buffers (crashed on the VM this was written on)",
    )
    parser.add_argument("--json", dest="json_path", default=None, help="write the results to this JSON file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-input", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build_requests(args: argparse.Namespace, model_dir: Path) -> list[dict]:
    from tokenmill.benchmarks.datasets import parse_range, random_requests
    from tokenmill.model.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(model_dir)
    requests = random_requests(
        tokenizer, args.num_prompts, parse_range(args.input_len), parse_range(args.output_len), seed=args.seed
    )
    return [{"prompt_token_ids": r.prompt_token_ids, "output_len": r.expected_output_len} for r in requests]


def run_worker(kind: str, spec: dict, timeout_s: float = 3600) -> dict:
    """Run one worker in a subprocess; returns its JSON result (or {"error": ...})."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        spec_path = f.name
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", kind, "--worker-input", spec_path],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=REPO_ROOT,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    finally:
        os.unlink(spec_path)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1][len("RESULT ") :])


def model_shape(model_dir: Path) -> dict:
    config = json.loads((model_dir / "config.json").read_text())
    h = config["hidden_size"]
    n_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or h // n_heads
    n_kv = config.get("num_key_value_heads", n_heads)
    layers = config["num_hidden_layers"]
    d_q, d_kv = n_heads * head_dim, n_kv * head_dim
    p_layer = h * d_q + 2 * h * d_kv + d_q * h + 3 * h * config["intermediate_size"] + 2 * h
    p_head = config["vocab_size"] * h
    p_embed = 0 if config.get("tie_word_embeddings", False) else p_head
    return {
        "layers": layers,
        "d_q": d_q,
        "d_kv": d_kv,
        "p_body": layers * p_layer,
        "p_head": p_head,
        "p_total": layers * p_layer + p_head + p_embed + h,
    }


def roofline_tok_per_s(
    requests: list[dict],
    concurrency: int,
    shape: dict,
    weight_bytes: float,
    kv_bytes_per_value: float,
    flops_per_s: float,
    bytes_per_s: float,
) -> dict:
    """Output tok/s the ceilings allow for these requests at this concurrency (formulas in the module doc)."""
    flops = 0.0
    kv_read = 0.0
    kv_per_token = 2 * shape["layers"] * shape["d_kv"] * kv_bytes_per_value
    for r in requests:
        p, o = len(r["prompt_token_ids"]), r["output_len"]
        flops += (
            2 * shape["p_body"] * (p + o)
            + 2 * shape["p_head"] * o
            + 2 * shape["layers"] * shape["d_q"] * (p + o) ** 2
        )
        kv_read += kv_per_token * (o * p + o * (o - 1) / 2)  # sum of t for t in [p, p + o)
    output_tokens = sum(r["output_len"] for r in requests)
    memory = output_tokens / concurrency * weight_bytes + kv_read
    compute_s, memory_s = flops / flops_per_s, memory / bytes_per_s
    return {
        "tok_per_s": output_tokens / max(compute_s, memory_s),
        "bound": "compute" if compute_s > memory_s else "memory",
        "compute_s": compute_s,
        "memory_s": memory_s,
    }


def decode_roofline(
    requests: list[dict],
    shape: dict,
    weight_bytes: float,
    kv_bytes_per_value: float,
    flops_per_s: float,
    bytes_per_s: float,
) -> float:
    """Single-request decode tok/s the ceilings allow at the requests' mean decode context."""
    contexts = [len(r["prompt_token_ids"]) + r["output_len"] / 2 for r in requests]
    t = sum(contexts) / len(contexts)
    flops = 2 * (shape["p_body"] + shape["p_head"]) + 4 * shape["layers"] * shape["d_q"] * t
    memory = weight_bytes + 2 * shape["layers"] * shape["d_kv"] * kv_bytes_per_value * t
    return 1.0 / max(flops / flops_per_s, memory / bytes_per_s)


def tokenmill_auto_dtype() -> str:
    """The activation dtype tokenmill picks on this CPU for --dtype auto (what the q4_1 engine runs in)."""
    from tokenmill.config import cpu_supports_bf16

    return "bfloat16" if cpu_supports_bf16() else "float32"


def compute_dtype(engine: str, precision: str) -> str:
    """Which measured matmul ceiling bounds an engine's compute: its own dtype for float engines; for the int8 and
    Q4_1 engines the activations' dtype (tokenmill's choice for q4_1; the faster of the two for CTranslate2 int8,
    an approximation: its integer dot-product kernels have their own peak)."""
    if precision in ("bfloat16", "float32"):
        return precision
    if engine == "tokenmill" and precision == "q4_1":
        return tokenmill_auto_dtype()
    return "float32" if engine == "ctranslate2" else "bfloat16"


def engine_memory_model(engine: str, precision: str, shape: dict, gguf: Path) -> tuple[float, float, str]:
    """(weight bytes read per step, KV bytes per value, precision label) for one engine."""
    if engine == "llama.cpp":
        return float(gguf.stat().st_size), 2.0, f"{precision.upper()} weights (GGUF), f16 KV"
    if engine == "tokenmill" and precision == "q4_1":
        # The GGUF's blocks kept packed (int4 / int8 kernels, about the file's bytes); activations and KV in the
        # engine's own choice of dtype (bf16 where the CPU has native bf16, else float32).
        kv_dtype = tokenmill_auto_dtype()
        kv_label = "bf16" if kv_dtype == "bfloat16" else "f32"
        return float(gguf.stat().st_size), WEIGHT_BYTES[kv_dtype], f"Q4_1 weights kept packed (GGUF), {kv_label} KV"
    per_weight = WEIGHT_BYTES[precision]
    weights = (shape["p_body"] + shape["p_head"]) * per_weight
    if engine == "ctranslate2":
        kv = 4.0  # float32 activations and cache on CPU, int8 or float32 weights
        return weights, kv, f"{precision} weights, f32 KV"
    return weights, per_weight, f"{precision} weights and KV"


def agreement_with(reference: list[list[int]], tokens: list[list[int]]) -> dict:
    """How closely greedy outputs match the first engine's: the share of requests with the same first token,
    and the mean length of the common prefix of the first HEAD_TOKENS tokens (low precisions drift apart on
    near-ties)."""
    pairs = list(zip(reference, tokens))
    same_first = sum(1 for a, b in pairs if a[:1] == b[:1])
    prefixes = []
    for a, b in pairs:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefixes.append(n)
    return {
        "first_token_agreement": same_first / max(len(pairs), 1),
        "mean_common_prefix": sum(prefixes) / max(len(prefixes), 1),
    }


def summarize_run(run: dict) -> dict:
    """Aggregate figures of one (engine, concurrency) run from its per-request timings."""
    from tokenmill.benchmarks.metrics import RequestResult, compute_metrics

    results = [RequestResult(**r) for r in run["results"]]
    metrics = compute_metrics(results, run["duration_s"])
    decoding = [(r.output_len - 1, r.latency - r.ttft) for r in results if r.output_len > 1]
    decode_tok_s = sum(n for n, _ in decoding) / sum(t for _, t in decoding) if decoding else math.nan
    return {
        "output_tok_per_s": metrics.output_throughput,
        "ttft_ms_mean": metrics.latency["ttft"].mean,
        "tpot_ms_mean": metrics.latency["tpot"].mean,
        # Per-request decode rate: tokens after the first / time after the first token, pooled.
        "decode_tok_per_s_per_request": decode_tok_s,
        "duration_s": run["duration_s"],
        "num_requests": metrics.num_completed,
        "output_tokens": metrics.total_output_tokens,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker, Path(args.worker_input))

    from benchmarks.peers.models import ct2_model_dir, gguf_path, hf_model_dir, quantized_model_dir
    from tokenmill.benchmarks.report import run_header, write_json

    model_dir = Path(args.model_dir) if args.model_dir else hf_model_dir()
    gguf = Path(args.gguf) if args.gguf else gguf_path()
    ct2_dir = Path(args.ct2_dir) if args.ct2_dir else ct2_model_dir()
    concurrencies = sorted({int(c) for c in args.concurrency.split(",")})
    engines = [tuple(e.split(":", 1)) for e in args.engines.split(",") if e]
    requests = build_requests(args, model_dir)
    shape = model_shape(model_dir)
    result = run_header("peers")
    result.update(
        model_dir=str(model_dir),
        gguf=str(gguf),
        ct2_dir=str(ct2_dir),
        threads=args.threads,
        shape=shape,
        dataset={
            "num_prompts": len(requests),
            "num_prompts_c1": args.num_prompts_c1,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "seed": args.seed,
        },
    )

    memory_models = {(e, p): engine_memory_model(e, p, shape, gguf) for e, p in engines}
    working_sets = sorted({int(weights) for weights, _, _ in memory_models.values()})
    print(f"Measuring ceilings ({args.threads} threads)...", flush=True)
    ceilings = run_worker(
        "ceilings",
        {
            "threads": args.threads,
            "size": args.ceiling_size,
            "mib": args.ceiling_mib,
            "working_sets": working_sets,
        },
    )
    if "error" in ceilings:
        raise SystemExit(f"ceiling measurement failed: {ceilings['error']}")
    result["ceilings"] = ceilings
    print(
        f"  matmul bf16 {ceilings['matmul_flops']['bfloat16'] / 1e9:.0f} GFLOP/s, "
        f"f32 {ceilings['matmul_flops']['float32'] / 1e9:.0f} GFLOP/s; "
        f"memory read {ceilings['read_bytes_per_s'] / 1e9:.1f} GB/s, "
        f"copy {ceilings['copy_bytes_per_s'] / 1e9:.1f} GB/s "
        f"({args.ceiling_mib} MiB); read over each engine's weight size: "
        + ", ".join(
            f"{int(k) / 2**20:.0f} MiB {v / 1e9:.1f} GB/s"
            for k, v in ceilings["read_bytes_per_s_at_working_set"].items()
        )
    )

    rows = []
    reference: dict[int, list[list[int]]] = {}  # concurrency -> the first engine's first output tokens
    for engine, precision in engines:
        print(f"Running {engine} ({precision})...", flush=True)
        spec = {
            "engine": engine,
            "precision": precision,
            "threads": args.threads,
            "model_dir": str(quantized_model_dir() if (engine, precision) == ("tokenmill", "q4_1") else model_dir),
            "gguf": str(gguf),
            "ct2_dir": str(ct2_dir),
            "requests": requests,
            "llama_extra_bufts": args.llama_extra_bufts,
            "runs": [
                {"concurrency": c, "num_requests": args.num_prompts_c1 if c == 1 else args.num_prompts}
                for c in concurrencies
            ],
        }
        out = run_worker("engine", spec)
        if "error" in out:
            print(f"  {engine} failed: {out['error']}", flush=True)
            rows.append({"engine": engine, "precision": precision, "error": out["error"]})
            continue
        weight_bytes, kv_bytes, label = memory_models[(engine, precision)]
        flops = ceilings["matmul_flops"][compute_dtype(engine, precision)]
        # Bandwidth when streaming a buffer the size of this engine's weights (cache residency included).
        bandwidth = ceilings["read_bytes_per_s_at_working_set"][str(int(weight_bytes))]
        for run in out["runs"]:
            c = run["concurrency"]
            used = requests[: run["num_requests"]]
            row = {
                "engine": engine,
                "precision": precision,
                "precision_detail": label,
                "concurrency": c,
                "weight_bytes": weight_bytes,
                "read_bytes_per_s": bandwidth,
                "version": out.get("version"),
                **summarize_run(run),
            }
            roof = roofline_tok_per_s(used, c, shape, weight_bytes, kv_bytes, flops, bandwidth)
            row.update(
                roofline_tok_per_s=roof["tok_per_s"],
                roofline_bound=roof["bound"],
                fraction_of_roofline=row["output_tok_per_s"] / roof["tok_per_s"],
            )
            reference.setdefault(c, run["head_tokens"])
            row.update(agreement_with(reference[c], run["head_tokens"]))
            if c == 1:
                decode_roof = decode_roofline(used, shape, weight_bytes, kv_bytes, flops, bandwidth)
                row.update(
                    decode_roofline_tok_per_s=decode_roof,
                    decode_fraction_of_roofline=row["decode_tok_per_s_per_request"] / decode_roof,
                )
            rows.append(row)
            print(
                f"  concurrency {c}: {row['output_tok_per_s']:.1f} output tok/s "
                f"({100 * row['fraction_of_roofline']:.1f}% of roofline)",
                flush=True,
            )
    result["rows"] = rows
    print()
    print(format_table(rows, ceilings, args.threads))
    if args.json_path:
        print(f"\nResults written to {write_json(args.json_path, result)}")
    return 0


def format_table(rows: list[dict], ceilings: dict, threads: int) -> str:
    lines = [
        f"Ceilings: matmul bf16 {ceilings['matmul_flops']['bfloat16'] / 1e9:.0f} GFLOP/s, "
        f"f32 {ceilings['matmul_flops']['float32'] / 1e9:.0f} GFLOP/s; memory read "
        f"{ceilings['read_bytes_per_s'] / 1e9:.1f} GB/s ({ceilings['buffer_mib']} MiB buffer); "
        f"{threads} threads. "
        "Rooflines use the read bandwidth over a buffer the size of each engine's weights:",
        ", ".join(
            f"{int(k) / 2**20:.0f} MiB: {v / 1e9:.1f} GB/s"
            for k, v in ceilings["read_bytes_per_s_at_working_set"].items()
        ),
        "",
        "| engine | precision | concurrency | output tok/s | roofline tok/s (bound) | % of roofline "
        "| mean TTFT ms "
        "| decode tok/s per request | % of decode roofline | same 1st token as row 1 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(
                f"| {row['engine']} | {row['precision']} | - | failed: {row['error'][:60]} | | | | | | |"
            )
            continue
        decode_frac = row.get("decode_fraction_of_roofline")
        lines.append(
            f"| {row['engine']} | {row['precision_detail']} | {row['concurrency']} "
            f"| {row['output_tok_per_s']:.1f} | {row['roofline_tok_per_s']:.0f} ({row['roofline_bound']}) "
            f"| {100 * row['fraction_of_roofline']:.1f}% "
            f"| {row['ttft_ms_mean']:.0f} | {row['decode_tok_per_s_per_request']:.1f} "
            f"| {'' if decode_frac is None else f'{100 * decode_frac:.1f}%'} "
            f"| {100 * row['first_token_agreement']:.0f}% |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# Workers (each in its own process): print one line "RESULT {json}"


def worker_main(kind: str, spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    if kind == "ceilings":
        out = measure_ceilings(spec["threads"], spec["size"], spec["mib"], spec.get("working_sets", []))
    else:
        out = run_engine(spec)
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_ceilings(threads: int, size: int, mib: int, working_sets: list[int] = ()) -> dict:
    """Peak matmul FLOP/s (bf16, float32), memory read / copy bandwidth over a `mib` MiB buffer, and read
    bandwidth over buffers as large as each engine's weights (a working set that fits the last-level cache
    reads faster than DRAM, for the engine as for this loop); best of a few repeats."""
    import torch

    torch.set_num_threads(threads)
    flops, sizes = {}, {}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        # A CPU without native bf16 runs bf16 matmuls emulated, hundreds of times slower: there the size shrinks
        # until one product takes about a second by a small product's rate (a 2048 one would take a minute).
        def product(n: int, dtype=dtype) -> tuple[float, int]:
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            out = torch.empty(n, n, dtype=dtype)
            return _best_seconds(lambda: torch.mm(a, b, out=out), 5 if n > 256 else 1), n

        probe, _ = product(256)
        n = size
        while n > 256 and probe * (n / 256) ** 3 > 1.0:
            n //= 2
        seconds, n = product(n)
        flops[name] = 2 * n**3 / seconds
        sizes[name] = n
    n = mib * 2**20 // 4
    x = torch.ones(n, dtype=torch.float32)
    y = torch.empty_like(x)
    read_s = _best_seconds(lambda x=x: x.sum(), 5)
    copy_s = _best_seconds(lambda x=x, y=y: y.copy_(x), 5)
    del x, y  # free the large buffers before the working-set ones
    read_at = {}  # working-set bytes -> read bytes/s
    for nbytes in sorted(set(working_sets)):
        buf = torch.ones(max(nbytes // 4, 1), dtype=torch.float32)
        read_at[str(nbytes)] = buf.numel() * 4 / _best_seconds(lambda buf=buf: buf.sum(), 10)
    return {
        "matmul_flops": flops,
        "matmul_size": sizes,  # per dtype: the square size measured (smaller where bf16 is emulated)
        "read_bytes_per_s": n * 4 / read_s,
        "copy_bytes_per_s": 2 * n * 4 / copy_s,
        "buffer_mib": mib,
        "threads": threads,
        "read_bytes_per_s_at_working_set": read_at,
    }


def _batches(requests: list[dict], concurrency: int) -> list[list[int]]:
    """Request indices, longest outputs first (so a batch's rows need similar numbers of steps), in batches of
    `concurrency`: how the static-batch engines (transformers, CTranslate2) are driven."""
    order = sorted(range(len(requests)), key=lambda i: -requests[i]["output_len"])
    return [order[b : b + concurrency] for b in range(0, len(order), concurrency)]


def _result(prompt_len: int, token_times: list[float], sent: float, start: float) -> dict:
    """A RequestResult dict from the times each counted output token came out."""
    from tokenmill.benchmarks.metrics import RequestResult

    ttft = token_times[0] - sent if token_times else 0.0
    itl = [b - a for a, b in zip(token_times, token_times[1:])]
    latency = (token_times[-1] if token_times else sent) - sent
    return asdict(
        RequestResult(
            prompt_len=prompt_len,
            output_len=len(token_times),
            ttft=ttft,
            latency=latency,
            itl=itl,
            start_time=sent - start,
        )
    )


def run_engine(spec: dict) -> dict:
    engine = spec["engine"]
    runner = {
        "tokenmill": TokenmillRunner,
        "transformers": TransformersRunner,
        "ctranslate2": CT2Runner,
        "llama.cpp": LlamaCppRunner,
    }.get(engine)
    if runner is None:
        raise SystemExit(f"unknown engine {engine!r}: use tokenmill, transformers, ctranslate2 or llama.cpp")
    instance = runner(spec)
    requests = spec["requests"]
    instance.generate(requests[:2], concurrency=2, warmup=True)
    runs = []
    for run in spec["runs"]:
        used = requests[: run["num_requests"]]
        start = time.perf_counter()
        results = instance.generate(used, run["concurrency"])
        duration = time.perf_counter() - start
        for r in results:
            r["start_time"] = max(0.0, r["start_time"])
        wanted = [r["output_len"] for r in used]
        got = [r["output_len"] for r in results]
        if got != wanted:
            raise RuntimeError(f"{engine} generated {got[:8]}... tokens, {wanted[:8]}... were asked for")
        runs.append(
            {
                "concurrency": run["concurrency"],
                "num_requests": len(used),
                "duration_s": duration,
                "results": results,
                "head_tokens": instance.head_tokens,
            }
        )
    return {"engine": engine, "precision": spec["precision"], "version": instance.version, "runs": runs}


class TokenmillRunner:
    """Continuous batching with at most `concurrency` requests in flight."""

    def __init__(self, spec: dict) -> None:
        import torch

        import tokenmill
        from tokenmill import LLM

        torch.set_num_threads(spec["threads"])
        # q4_1: the bundled GGUF's converted directory, weights kept quantized, activations in the engine's
        # choice of dtype (--dtype auto: bf16 where the CPU has native bf16, else float32).
        dtype = "auto" if spec["precision"] == "q4_1" else spec["precision"]
        self.llm = LLM(spec["model_dir"], dtype=dtype, show_progress=False)
        self.version = tokenmill.__version__

    def generate(self, requests: list[dict], concurrency: int, warmup: bool = False) -> list[dict]:
        from tokenmill.benchmarks.datasets import SampleRequest
        from tokenmill.benchmarks.throughput import reset_prefix_cache, run_offline

        reset_prefix_cache(self.llm)
        samples = [SampleRequest("", r["prompt_token_ids"], r["output_len"]) for r in requests]
        run = run_offline(self.llm, samples, max_concurrency=concurrency, use_tqdm=False)
        self.head_tokens = [ids[:HEAD_TOKENS] for ids in run.token_ids]
        return [asdict(r) for r in run.results]


class TransformersRunner:
    """Batches of `concurrency` requests, left-padded; token times from a streamer called at every step."""

    def __init__(self, spec: dict) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(spec["threads"])
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[
            spec["precision"]
        ]
        self.model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype).eval()
        pad = self.model.generation_config.pad_token_id
        if pad is None:
            pad = self.model.config.eos_token_id
        self.pad_id = int(pad[0] if isinstance(pad, list) else pad or 0)
        self.version = transformers.__version__

    def generate(self, requests: list[dict], concurrency: int, warmup: bool = False) -> list[dict]:
        import torch
        from transformers.generation.streamers import BaseStreamer

        class StepTimes(BaseStreamer):
            def __init__(self) -> None:
                self.times: list[float] = []
                self.tokens: list[list[int]] = []  # step -> the token of each row
                self.prompt_seen = False

            def put(self, value) -> None:  # first call: the prompt; then one call per generated step
                if self.prompt_seen:
                    self.times.append(time.perf_counter())
                    self.tokens.append(value.reshape(-1).tolist())
                self.prompt_seen = True

            def end(self) -> None:
                pass

        start = time.perf_counter()
        results: list[dict | None] = [None] * len(requests)
        self.head_tokens: list[list[int]] = [[] for _ in requests]
        for batch in _batches(requests, concurrency):
            prompts = [requests[i]["prompt_token_ids"] for i in batch]
            width = max(len(p) for p in prompts)
            input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)  # [batch, width]
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, prompt in enumerate(prompts):
                input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
                mask[row, width - len(prompt) :] = 1
            max_new = max(requests[i]["output_len"] for i in batch)
            streamer = StepTimes()
            sent = time.perf_counter()
            with torch.inference_mode():
                self.model.generate(
                    input_ids=input_ids,
                    attention_mask=mask,
                    max_new_tokens=max_new,
                    min_new_tokens=max_new,
                    do_sample=False,
                    pad_token_id=self.pad_id,
                    streamer=streamer,
                )
            for row, i in enumerate(batch):
                results[i] = _result(
                    len(requests[i]["prompt_token_ids"]),
                    streamer.times[: requests[i]["output_len"]],
                    sent,
                    start,
                )
                self.head_tokens[i] = [step[row] for step in streamer.tokens[:HEAD_TOKENS]]
        return results


class CT2Runner:
    """generate_batch over `concurrency` prompts at a time; the step callback stops each row at its length."""

    def __init__(self, spec: dict) -> None:
        import ctranslate2

        from tokenmill.model.tokenizer import Tokenizer

        self.generator = ctranslate2.Generator(
            spec["ct2_dir"],
            device="cpu",
            compute_type=spec["precision"],
            intra_threads=spec["threads"],
            inter_threads=1,
        )
        self.tokenizer = Tokenizer.from_pretrained(spec["model_dir"])
        self.version = ctranslate2.__version__

    def generate(self, requests: list[dict], concurrency: int, warmup: bool = False) -> list[dict]:
        start = time.perf_counter()
        results: list[dict | None] = [None] * len(requests)
        self.head_tokens: list[list[int]] = [[] for _ in requests]
        for batch in _batches(requests, concurrency):
            wanted = [requests[i]["output_len"] for i in batch]
            times: list[list[float]] = [[] for _ in batch]
            tokens: list[list[int]] = [[] for _ in batch]

            def on_step(step, times=times, tokens=tokens, wanted=wanted) -> bool:
                times[step.batch_id].append(time.perf_counter())
                tokens[step.batch_id].append(step.token_id)
                return len(times[step.batch_id]) >= wanted[step.batch_id]  # True stops this row

            prompts = [
                [self.tokenizer.id_to_token(t) for t in requests[i]["prompt_token_ids"]] for i in batch
            ]
            sent = time.perf_counter()
            self.generator.generate_batch(
                prompts,
                max_length=max(wanted),
                min_length=max(wanted),
                beam_size=1,
                sampling_topk=1,
                include_prompt_in_result=False,
                callback=on_step,
            )
            for row, i in enumerate(batch):
                results[i] = _result(
                    len(requests[i]["prompt_token_ids"]), times[row][: wanted[row]], sent, start
                )
                self.head_tokens[i] = tokens[row][:HEAD_TOKENS]
        return results


class LlamaCppRunner:
    """The GGUF through llama.cpp's C API: `concurrency` sequences share one llama_batch per decode step.

    llama.cpp's "extra buffer types" (AMX int8 matmul on CPUs with AMX, repacked Q4_0/IQ4_NL layouts) are off
    unless --llama-extra-bufts: with llama-cpp-python 0.3.36 the AMX path crashed (SIGSEGV in
    ggml_backend_amx_mul_mat) on the Sapphire Rapids VM this was written on. The Q4_1 weights are not
    repacked.
    """

    def __init__(self, spec: dict) -> None:
        import llama_cpp

        self.lib = llama_cpp
        self.version = llama_cpp.__version__
        threads = spec["threads"]
        max_len = max(len(r["prompt_token_ids"]) + r["output_len"] for r in spec["requests"])
        self.max_seqs = max(run["concurrency"] for run in spec["runs"])
        # llama.cpp rounds the context up to a multiple of 256 and wants it divisible by n_seq_max; each of
        # the n_seq_max sequences gets n_ctx / n_seq_max KV cells.
        self.n_ctx = self.max_seqs * 256 * math.ceil((max_len + 8) / 256)
        self.n_batch = 512
        self._log_callback = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(self._log_callback, None)  # keep llama.cpp's loading chatter off stderr
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.use_extra_bufts = bool(spec.get("llama_extra_bufts", False))
        self.model = llama_cpp.llama_model_load_from_file(spec["gguf"].encode(), model_params)
        if self.model is None:
            raise RuntimeError(f"llama.cpp could not load {spec['gguf']}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_ctx
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_seq_max = self.max_seqs
        params.n_threads = params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if self.ctx is None:
            raise RuntimeError(
                f"llama.cpp could not make a context of {self.n_ctx} tokens x {self.max_seqs} sequences"
            )

    def _clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """entries: (token, position, sequence, wants_logits); decoded in chunks of n_batch tokens."""
        import numpy as np

        lib = self.lib
        for chunk_start in range(0, len(entries), self.n_batch):
            chunk = entries[chunk_start : chunk_start + self.n_batch]
            batch = lib.llama_batch_init(len(chunk), 0, 1)
            try:
                for k, (token, pos, seq, logits) in enumerate(chunk):
                    batch.token[k] = token
                    batch.pos[k] = pos
                    batch.n_seq_id[k] = 1
                    batch.seq_id[k][0] = seq
                    batch.logits[k] = logits
                batch.n_tokens = len(chunk)
                rc = lib.llama_decode(self.ctx, batch)
                if rc != 0:
                    raise RuntimeError(f"llama_decode returned {rc}")
                for k, (_, _, seq, logits) in enumerate(chunk):
                    if logits:
                        row = np.ctypeslib.as_array(
                            lib.llama_get_logits_ith(self.ctx, k), shape=(self.n_vocab,)
                        )
                        self._next[seq] = int(row.argmax())
            finally:
                lib.llama_batch_free(batch)

    def generate(self, requests: list[dict], concurrency: int, warmup: bool = False) -> list[dict]:
        start = time.perf_counter()
        results: list[dict | None] = [None] * len(requests)
        self.head_tokens: list[list[int]] = [[] for _ in requests]
        pending = list(range(len(requests)))
        # Groups of `concurrency` requests: each group is prefilled, then decoded together until all are done.
        for g in range(0, len(pending), concurrency):
            group = pending[g : g + concurrency]
            self._clear()
            self._next: dict[int, int] = {}
            sent = time.perf_counter()
            entries = []
            for seq, i in enumerate(group):
                prompt = requests[i]["prompt_token_ids"]
                entries += [(t, pos, seq, pos == len(prompt) - 1) for pos, t in enumerate(prompt)]
            self._decode(entries)
            times: dict[int, list[float]] = {seq: [time.perf_counter()] for seq in range(len(group))}
            tokens: dict[int, list[int]] = {seq: [self._next[seq]] for seq in range(len(group))}
            active = [seq for seq, i in enumerate(group) if requests[i]["output_len"] > 1]
            while active:
                step = [
                    (
                        self._next[seq],
                        len(requests[group[seq]]["prompt_token_ids"]) + len(times[seq]) - 1,
                        seq,
                        True,
                    )
                    for seq in active
                ]
                self._decode(step)
                now = time.perf_counter()
                for seq in active:
                    times[seq].append(now)
                    tokens[seq].append(self._next[seq])
                active = [seq for seq in active if len(times[seq]) < requests[group[seq]]["output_len"]]
            for seq, i in enumerate(group):
                results[i] = _result(len(requests[i]["prompt_token_ids"]), times[seq], sent, start)
                self.head_tokens[i] = tokens[seq][:HEAD_TOKENS]
        return results


if __name__ == "__main__":
    sys.exit(main())
