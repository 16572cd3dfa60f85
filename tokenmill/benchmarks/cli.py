"""`tokenmill bench throughput` (offline, in-process) and `tokenmill bench serve` (any OpenAI server)."""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tokenmill.benchmarks.metrics import DEFAULT_PERCENTILES

_EPILOG = """examples:
  tokenmill bench throughput --num-prompts 64 --input-len 32-512 --output-len 32-256 --max-concurrency 1,8,64
  tokenmill bench throughput --dataset prefix-repetition --max-concurrency 4 --no-enable-prefix-caching
  tokenmill bench serve --base-url http://127.0.0.1:8000 --request-rate 4 --json serve.json --plot plots/
"""


def _add_dataset_args(parser: argparse.ArgumentParser, add_seed: bool = True) -> None:
    group = parser.add_argument_group("dataset")
    group.add_argument(
        "--dataset",
        choices=["random", "prefix-repetition", "sharegpt"],
        default=None,
        help="requests to send (default: sharegpt with --dataset-path, else random)",
    )
    group.add_argument(
        "--dataset-path", default=None, help="ShareGPT-format JSON file (for --dataset sharegpt)"
    )
    group.add_argument("--num-prompts", type=int, default=64, help="number of requests (default: %(default)s)")
    group.add_argument(
        "--input-len",
        default="128",
        help="random: prompt tokens, a length or a MIN-MAX range drawn uniformly (e.g. 32-512)",
    )
    group.add_argument(
        "--output-len",
        default=None,
        help="output tokens (default 128): a length or (random) a MIN-MAX range; for sharegpt a "
        "fixed length replacing the lengths of the dataset's replies",
    )
    group.add_argument(
        "--prefix-len", type=int, default=512, help="prefix-repetition: tokens of each shared prefix"
    )
    group.add_argument(
        "--suffix-len", type=int, default=32, help="prefix-repetition: tokens after the prefix"
    )
    group.add_argument(
        "--num-prefixes", type=int, default=4, help="prefix-repetition: distinct shared prefixes"
    )
    if add_seed:  # `bench throughput` shares the engine's --seed
        group.add_argument("--seed", type=int, default=0, help="seed of the dataset and of the arrival times")


def _add_load_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("load")
    group.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="requests per second with Poisson arrivals (default inf: all at once)",
    )
    group.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="shape of the gamma-distributed gaps between arrivals: 1 = Poisson, <1 burstier",
    )
    group.add_argument(
        "--max-concurrency",
        default=None,
        help="most requests in flight; a comma-separated list (1,8,64) runs a sweep",
    )


def _add_output_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--json", dest="json_path", default=None, help="write the results to this JSON file")
    group.add_argument(
        "--save-detailed", action="store_true", help="with --json: also write each request's timings"
    )
    group.add_argument(
        "--plot",
        dest="plot_dir",
        default=None,
        help="write PNG plots to this directory (latency CDFs; throughput and p99 TTFT for a sweep)",
    )
    group.add_argument(
        "--percentiles",
        default=",".join(f"{p:g}" for p in DEFAULT_PERCENTILES),
        help="percentiles reported besides mean and median (90 and 99 always)",
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bar")


def _percentiles(text: str) -> list[float]:
    try:
        values = {float(p) for p in text.split(",") if p.strip()}
    except ValueError:
        raise ValueError(f"--percentiles {text!r}: give comma-separated numbers such as 90,99") from None
    return sorted(values | set(DEFAULT_PERCENTILES))


def build_requests(args: argparse.Namespace, tokenizer) -> list:
    from tokenmill.benchmarks import datasets

    name = args.dataset or ("sharegpt" if args.dataset_path else "random")
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    output_len = datasets.parse_range(args.output_len or "128")
    if name == "random":
        return datasets.random_requests(
            tokenizer, args.num_prompts, datasets.parse_range(args.input_len), output_len, seed=args.seed
        )
    if output_len[0] != output_len[1]:
        raise ValueError(f"--output-len {args.output_len}: the {name} dataset takes one length, not a range")
    if name == "prefix-repetition":
        return datasets.prefix_repetition_requests(
            tokenizer,
            args.num_prompts,
            prefix_len=args.prefix_len,
            suffix_len=args.suffix_len,
            num_prefixes=args.num_prefixes,
            output_len=output_len[0],
            seed=args.seed,
        )
    if not args.dataset_path:
        raise ValueError("--dataset sharegpt needs --dataset-path FILE.json")
    fixed = output_len[0] if args.output_len is not None else None
    return datasets.sharegpt_requests(
        tokenizer, args.dataset_path, args.num_prompts, output_len=fixed, seed=args.seed
    )


def _dataset_record(args: argparse.Namespace, requests: list) -> dict[str, Any]:
    record = {
        "name": args.dataset or ("sharegpt" if args.dataset_path else "random"),
        "num_prompts": len(requests),
        "seed": args.seed,
        "total_prompt_tokens": sum(r.prompt_len for r in requests),
        "total_output_tokens": sum(r.expected_output_len for r in requests),
    }
    if record["name"] == "random":
        record.update(input_len=args.input_len, output_len=args.output_len or "128")
    elif record["name"] == "prefix-repetition":
        record.update(
            prefix_len=args.prefix_len,
            suffix_len=args.suffix_len,
            num_prefixes=args.num_prefixes,
            output_len=args.output_len or "128",
        )
    else:
        record.update(path=str(args.dataset_path), output_len=args.output_len)
    return record


def _run_record(
    concurrency: int | None, args: argparse.Namespace, metrics, results, **extra
) -> dict[str, Any]:
    record = {
        "max_concurrency": concurrency,
        "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
        "burstiness": args.burstiness,
        "metrics": metrics.to_dict(),
        **extra,
    }
    if args.save_detailed:
        record["requests"] = [asdict(r) for r in results]
    return record


def _finish(args: argparse.Namespace, benchmark: str, header: dict, runs: list[tuple]) -> None:
    """Write --json and --plot outputs. runs: (max_concurrency, metrics, results, record)."""
    from tokenmill.benchmarks.report import write_json

    if args.json_path:
        header["runs"] = [record for *_, record in runs]
        path = write_json(args.json_path, header)
        print(f"Results written to {path}")
    if args.plot_dir:
        from tokenmill.benchmarks import plots

        plot_dir = Path(args.plot_dir)
        title = f"tokenmill bench {benchmark}: {header['dataset']['name']}, {header['model']}"
        labelled = [
            (f"concurrency {c}" if c else "no concurrency limit", results) for c, _, results, _ in runs
        ]
        written = [plots.plot_latency_cdfs(labelled, plot_dir / f"{benchmark}_latency_cdf.png", title)]
        swept = [(c, m) for c, m, _, _ in runs if c is not None]
        if len(swept) > 1:
            written.append(
                plots.plot_sweep(
                    [c for c, _ in swept], [m for _, m in swept], plot_dir / f"{benchmark}_sweep.png", title
                )
            )
        print("Plots written:", ", ".join(str(p) for p in written))


def _run_throughput(args: argparse.Namespace) -> int:
    from tokenmill import LLM
    from tokenmill.benchmarks.load import parse_concurrencies
    from tokenmill.benchmarks.metrics import compute_metrics, format_report
    from tokenmill.benchmarks.report import run_header
    from tokenmill.benchmarks.throughput import reset_prefix_cache, run_offline, warm_up
    from tokenmill.entrypoints.generate_cli import engine_kwargs

    concurrencies = parse_concurrencies(args.max_concurrency)
    percentiles = _percentiles(args.percentiles)
    llm = LLM(args.model, **engine_kwargs(args))
    requests = build_requests(args, llm.get_tokenizer())
    header = run_header("throughput")
    header.update(
        model=str(llm.llm_engine.model_dir),
        dtype=llm.llm_engine.dtype,
        engine={k: v for k, v in engine_kwargs(args).items() if k != "chat_template"},
        dataset=_dataset_record(args, requests),
    )
    warm_up(llm, args.num_warmups)
    runs = []
    for concurrency in concurrencies:
        reset_prefix_cache(llm)
        run = run_offline(llm, requests, **_load_kwargs(args, concurrency), profile_steps=args.profile_steps)
        metrics = compute_metrics(run.results, run.duration_s, percentiles)
        engine_stats = run.engine_stats()
        title = f"Offline Benchmark (concurrency {concurrency or 'unlimited'})"
        print(
            format_report(
                metrics,
                title,
                extra={"Engine steps": run.num_steps, "Mean step compute (ms)": engine_stats["mean_step_ms"]},
            )
        )
        if run.profile:
            print(run.profile)
        runs.append(
            (
                concurrency,
                metrics,
                run.results,
                _run_record(
                    concurrency, args, metrics, run.results, engine_stats=engine_stats, profile=run.profile
                ),
            )
        )
    _finish(args, "throughput", header, runs)
    return 0


def _load_kwargs(args: argparse.Namespace, concurrency: int | None) -> dict:
    """The load shape both runners take: concurrency cap, arrival process, seed, progress bar."""
    return dict(max_concurrency=concurrency, request_rate=args.request_rate, burstiness=args.burstiness,
                seed=args.seed, use_tqdm=not args.no_progress)


def _run_serve(args: argparse.Namespace) -> int:
    from tokenmill.benchmarks.load import parse_concurrencies
    from tokenmill.benchmarks.metrics import compute_metrics, format_report
    from tokenmill.benchmarks.report import run_header
    from tokenmill.benchmarks.serve import ServeTarget, run_serve_sync
    from tokenmill.model.default_model import prepare_model
    from tokenmill.model.tokenizer import Tokenizer

    concurrencies = parse_concurrencies(args.max_concurrency)
    percentiles = _percentiles(args.percentiles)
    tokenizer = Tokenizer.from_pretrained(prepare_model(args.tokenizer))
    requests = build_requests(args, tokenizer)
    target = ServeTarget(
        args.base_url,
        args.model,
        args.endpoint,
        ignore_eos=args.ignore_eos,
        request_timeout_s=args.request_timeout,
    )
    header = run_header("serve")
    header.update(base_url=target.root, endpoint=target.url, dataset=_dataset_record(args, requests))
    runs = []
    for concurrency in concurrencies:
        run = run_serve_sync(target, requests, **_load_kwargs(args, concurrency), num_warmups=args.num_warmups)
        header["model"] = run.model
        metrics = compute_metrics(run.results, run.duration_s, percentiles)
        title = f"Serving Benchmark (concurrency {concurrency or 'unlimited'})"
        rate = f"{args.request_rate:g}" if math.isfinite(args.request_rate) else "inf"
        print(format_report(metrics, title, extra={"Request rate (req/s)": rate}))
        errors = sorted({r.error for r in run.results if not r.success})
        for error in errors[:5]:
            print(f"  failed: {error}", file=sys.stderr)
        runs.append(
            (
                concurrency,
                metrics,
                run.results,
                _run_record(concurrency, args, metrics, run.results, errors=errors),
            )
        )
    _finish(args, "serve", header, runs)
    failed = sum(m.num_failed for _, m, _, _ in runs)
    return 1 if failed and all(m.num_completed == 0 for _, m, _, _ in runs) else 0


def register(subparsers) -> None:
    from tokenmill.entrypoints.generate_cli import add_engine_args

    bench = subparsers.add_parser(
        "bench",
        help="measure throughput and latency (offline, or against an OpenAI-compatible server)",
        description="Benchmarks reporting request and token throughput, TTFT, TPOT, ITL and end-to-end "
        "latency "
        "(mean, median, p90, p99), as vLLM's bench does.",
    )
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    bench.set_defaults(func=lambda args: (bench.print_help(), 2)[1])

    throughput = bench_sub.add_parser(
        "throughput",
        help="offline benchmark of an in-process engine",
        description="Run the dataset through an in-process engine (no server): throughput and latency.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_engine_args(throughput)  # its --seed also seeds the dataset and the arrival times
    _add_dataset_args(throughput, add_seed=False)
    _add_load_args(throughput)
    _add_output_args(throughput)
    throughput.add_argument("--num-warmups", type=int, default=1, help="short requests run before measuring")
    throughput.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="profile this many engine steps at full batch (torch ops, then tokenmill Python); "
        "the profiler slows those steps, so latencies of a profiled run are inflated",
    )
    throughput.set_defaults(func=_run_throughput)

    serve = bench_sub.add_parser(
        "serve",
        help="benchmark a running OpenAI-compatible server (tokenmill, vLLM, llama.cpp, ...)",
        description="Stream the dataset's requests to an OpenAI-compatible server; report throughput and "
        "latency.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--base-url", required=True, help="server address, e.g. http://127.0.0.1:8000")
    serve.add_argument(
        "--model", default=None, help="model name to request (default: the first at /v1/models)"
    )
    serve.add_argument(
        "--endpoint",
        choices=["completions", "chat"],
        default="completions",
        help="/v1/completions or /v1/chat/completions",
    )
    serve.add_argument(
        "--tokenizer",
        default=None,
        help="model directory or .gguf whose tokenizer builds and measures the prompts "
        "(default: the bundled SmolLM2-135M-Instruct)",
    )
    serve.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ask the server to generate exactly the requested output length (vLLM's ignore_eos)",
    )
    serve.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request fails")
    serve.add_argument("--num-warmups", type=int, default=1, help="short requests sent before measuring")
    _add_dataset_args(serve)
    _add_load_args(serve)
    _add_output_args(serve)
    serve.set_defaults(func=_run_serve)

    quality = bench_sub.add_parser(
        "quality",
        help="quantized vs full precision on your prompts: KL divergence, top-1 and greedy agreement",
        description="Run a model at full precision and quantized (as stored for a GGUF, and with each "
        "--quantization) on the same prompts: mean per-token KL divergence, top-1 agreement and greedy "
        "agreement over the full-precision model's own continuations.",
    )
    quality.add_argument("--model", default=None, help="model directory, .gguf file or hub id (default: the "
                         "bundled SmolLM2-135M-Instruct)")
    quality.add_argument("--quantization", default="int8,int4",
                         help="comma-separated methods to quantize the full-precision weights with at load "
                              "(default int8,int4; '' for none)")
    quality.add_argument("--prompts-file", default=None,
                         help="text file with one prompt per line (default: 64 built-in prompts)")
    quality.add_argument("--num-prompts", type=int, default=64, help="use at most this many prompts")
    quality.add_argument("--max-tokens", type=int, default=128, help="tokens of each reference continuation")
    quality.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    quality.add_argument("--json", dest="json_path", default=None, help="write the results to this JSON file")
    quality.set_defaults(func=_run_quality)


def _run_quality(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from tokenmill.benchmarks.quality import DEFAULT_PROMPTS, format_results, results_json, run

    if args.prompts_file:
        prompts = [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        if not prompts:
            raise SystemExit(f"{args.prompts_file} holds no prompts (one per line)")
    else:
        prompts = DEFAULT_PROMPTS
    if args.num_prompts < 1 or args.max_tokens < 1:
        raise SystemExit("--num-prompts and --max-tokens must be positive")
    methods = [m.strip() for m in args.quantization.split(",") if m.strip()]
    results = run(args.model, methods, prompts[: args.num_prompts], args.max_tokens, args.dtype)
    print(format_results(results))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"benchmark": "quality", "model": args.model,
                                                    "num_prompts": min(len(prompts), args.num_prompts),
                                                    "max_tokens": args.max_tokens,
                                                    "results": results_json(results)}, indent=2))
    return 0
