"""`tokenmill plan`: memory, fit, speed and cost of a model on the catalog's devices."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tokenmill.planner.dtypes import PRECISION_NAMES
from tokenmill.planner.fit import ServingConfig
from tokenmill.planner.gpus import PRICE_DATE, list_gpus, load_gpu_catalog
from tokenmill.planner.models import list_models
from tokenmill.planner.plan import Plan, Workload, plan
from tokenmill.planner.report import format_plan, format_plan_markdown, format_table


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        nargs="?",
        help="catalog name (e.g. Llama-3.1-8B), a config.json, a Hugging Face model directory, or a .gguf file",
    )
    p.add_argument(
        "--precision",
        default="auto",
        help=f"weight precision: auto (as stored) or one of {', '.join(PRECISION_NAMES)} (default: auto)",
    )
    p.add_argument(
        "--group-size", type=int, default=None, help="AWQ/GPTQ quantization group size (default: 128)"
    )
    p.add_argument(
        "--kv-dtype",
        "--kv-cache-dtype",
        dest="kv_dtype",
        default="auto",
        help="KV cache dtype: auto (activation dtype), bfloat16, float16, fp8 (default: auto)",
    )
    p.add_argument(
        "--context",
        "--max-model-len",
        dest="context",
        type=int,
        default=None,
        help="tokens per sequence the KV cache must hold (default: min(4096, model maximum))",
    )
    p.add_argument("--concurrency", type=int, default=16, help="sequences served at once (default: 16)")
    p.add_argument("--input-len", type=int, default=None, help="prompt tokens of a typical request")
    p.add_argument(
        "--output-len",
        type=int,
        default=None,
        help="generated tokens of a typical request (default: min(512, context/4))",
    )
    p.add_argument(
        "--gpu",
        action="append",
        default=None,
        help="device(s) to plan on, repeatable or comma-separated (default: every GPU in the catalog)",
    )
    p.add_argument(
        "--tp",
        "--tensor-parallel-size",
        dest="tp",
        type=int,
        default=None,
        help="tensor-parallel size (default: the smallest that fits)",
    )
    p.add_argument(
        "--pp",
        "--pipeline-parallel-size",
        dest="pp",
        type=int,
        default=1,
        help="pipeline stages (layers split evenly, the first stages taking one more; default: 1)",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="fraction of device memory the engine may use (default: 0.9)",
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="tokens per forward pass; sizes the activation peak (default: 8192 on >=70 GiB devices, else 2048)",
    )
    p.add_argument("--max-num-seqs", type=int, default=256, help="max sequences per step (default: 256)")
    p.add_argument("--block-size", type=int, default=16, help="KV cache block size in tokens (default: 16)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (saves their memory)")
    p.add_argument(
        "--utilization",
        type=float,
        default=0.5,
        help="fraction of the time the deployment is busy, for cost per token (default: 0.5)",
    )
    p.add_argument(
        "--workload",
        choices=["realtime", "batch"],
        default="realtime",
        help="realtime (interactive, on-demand) or batch (interruptible, spot) (default: realtime)",
    )
    p.add_argument(
        "--api-price",
        type=float,
        default=None,
        help="an API's $ per 1M input tokens (and output tokens unless --api-price-output is given)",
    )
    p.add_argument("--api-price-output", type=float, default=None, help="the API's $ per 1M output tokens")
    p.add_argument(
        "--gpu-catalog",
        default=None,
        help="JSON/TOML file overriding or adding devices (prices, memory, bandwidth)",
    )
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the plan as JSON")
    output.add_argument(
        "--markdown", action="store_true", help="print the plan as Markdown (a table and lists, for a PR or issue)"
    )
    p.add_argument(
        "--emit",
        choices=["helm-values"],
        default=None,
        help="helm-values: print a values file for deploy/helm/tokenmill sized by the plan (GPU count and type, "
        "tensorParallelSize, gpuMemoryUtilization, maxModelLen, maxNumSeqs, memory requests); refuses when "
        "nothing fits",
    )
    p.add_argument("--output", "-o", default=None, metavar="FILE", help="with --emit: write to FILE, not stdout")
    p.add_argument(
        "--plot",
        nargs="?",
        const="plan-memory.png",
        default=None,
        metavar="PNG",
        help="write the memory breakdown per device as a PNG (default path: plan-memory.png)",
    )
    p.add_argument("--list-models", action="store_true", help="list the built-in model catalog and exit")
    p.add_argument("--list-gpus", action="store_true", help="list the device catalog and exit")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `plan` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "plan",
        help="VRAM, GPU fit, concurrency, throughput and cost of a model",
        description="Plan serving a model: memory breakdown, which GPUs fit and at what tensor-parallel size, "
        "max concurrency and context, decode/prefill speed from rooflines, and cost.",
    )
    add_arguments(p)
    p.set_defaults(func=run_plan)
    return p


def _gpu_names(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [name.strip() for v in values for name in v.split(",") if name.strip()]


def _list_gpus(catalog: dict) -> str:
    rows = []
    for g in list_gpus(catalog):
        rows.append(
            [
                g.name,
                g.kind,
                f"{g.memory_gib:g}",
                f"{g.bandwidth_gbps:g}",
                f"{g.bf16_tflops:g}",
                "-" if g.on_demand_per_hour is None else f"${g.on_demand_per_hour:.2f}",
                "-" if g.spot_per_hour is None else f"${g.spot_per_hour:.2f}",
                g.price_date or "-",
                g.interconnect or "-",
                "-" if g.interconnect_gbps is None else f"{g.interconnect_gbps:g}",
            ]
        )
    cols = [
        ("device", "<"),
        ("kind", "<"),
        ("GiB", ">"),
        ("GB/s", ">"),
        ("bf16 TFLOP/s", ">"),
        ("on-demand/h", ">"),
        ("spot/h", ">"),
        ("prices of", "<"),
        ("GPU link", "<"),
        ("link GB/s/dir", ">"),
    ]
    return format_table(rows, cols) + f"\nprices: representative US per-device-hour list prices, {PRICE_DATE}"


def run_plan(args: argparse.Namespace) -> int:
    """Handler of `tokenmill plan`; returns the exit code."""
    try:
        catalog = load_gpu_catalog(args.gpu_catalog)
        if args.list_models:
            print("\n".join(list_models()))
            return 0
        if args.list_gpus:
            print(_list_gpus(catalog))
            return 0
        if not args.model:
            raise ValueError(
                "missing MODEL: give a catalog name, a config.json, a model directory or a .gguf file"
            )
        from tokenmill.planner.arch import load_arch

        arch = load_arch(args.model)
        context = args.context or min(4096, arch.max_position_embeddings)
        workload = Workload(
            context_len=context,
            concurrency=args.concurrency,
            input_len=args.input_len,
            output_len=args.output_len,
            utilization=args.utilization,
            workload=args.workload,
            api_price_input=args.api_price,
            api_price_output=args.api_price_output,
        )
        serving = ServingConfig(
            precision=args.precision,
            group_size=args.group_size,
            kv_dtype=args.kv_dtype,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=args.max_num_seqs,
            block_size=args.block_size,
            enforce_eager=args.enforce_eager,
        )
        gpus = _gpu_names(args.gpu)
        result = plan(arch, gpus, workload, serving, args.tp, catalog, args.pp)
        if args.emit == "helm-values":
            return _emit_helm_values(result, args.output)
        if args.output:
            raise ValueError("--output goes with --emit helm-values")
        names = [g.gpu.name for g in result.gpus[: len(gpus)]] if gpus else None
        if args.json:
            print(json.dumps(result.to_dict(), indent=2, default=str))
        elif args.markdown:
            sys.stdout.write(format_plan_markdown(result, details_for=names))
        else:
            print(format_plan(result, details_for=names))
        if args.plot:
            from tokenmill.planner.plot import plot_memory

            path = plot_memory(result, args.plot)
            print(f"wrote {path}", file=sys.stderr)
        return 0
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _emit_helm_values(result: Plan, output: str | None) -> int:
    from tokenmill.planner.helm import format_helm_values

    command = "tokenmill plan " + " ".join(a for a in sys.argv[2:] if a) if sys.argv[1:2] == ["plan"] else None
    text = format_helm_values(result, command)
    if output:
        from pathlib import Path

        Path(output).write_text(text)
        print(f"wrote {output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenmill")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
