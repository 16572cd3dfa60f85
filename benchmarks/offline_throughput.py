"""Offline output-token throughput: tokenmill against transformers' batched generate, in one run.

    python benchmarks/offline_throughput.py      # 64 requests, prompts 32-512, outputs 32-256 tokens
    python benchmarks/offline_throughput.py --json offline.json

Both engines run the same model (the HF-style directory that tokenmill makes from the bundled
SmolLM2-135M-Instruct GGUF, from prepare_model(None), loaded by transformers with AutoModelForCausalLM), in
the same process, in the same dtype (tokenmill's resolved --dtype) and with the same torch thread count, on
the same seeded requests (random token prompts, greedy, end-of-sequence ignored so every request generates
exactly its own output length).

- tokenmill: all requests are queued at once; continuous batching runs them (`tokenmill bench throughput`
  loop).
- transformers: requests are sorted by output length (longest first) and cut into batches of --hf-batch-size
  (default: all of them in one batch, the same 64-way concurrency tokenmill gets). Each batch is left-padded
  to its longest prompt and generated greedily for the batch's longest output length (min_new_tokens =
  max_new_tokens keeps end-of-sequence from stopping a row early). Only the tokens each request asked for are
  counted; the extra tokens shorter requests generate in a longer batch are work transformers does but does
  not get credit for, exactly as a user who needed those lengths would see it.

Output tokens per second = tokens asked for / wall-clock seconds of the whole run (prefill included). Target
(issue 2): tokenmill >= 3x transformers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

TARGET_RATIO = 3.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument(
        "--model",
        default=None,
        help="HF model directory or .gguf (default: the bundled SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", default="32-512", help="prompt tokens, MIN-MAX drawn uniformly")
    parser.add_argument("--output-len", default="32-256", help="output tokens, MIN-MAX drawn uniformly")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="both engines' dtype (auto: tokenmill's choice, bf16 where the CPU runs it fast)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    parser.add_argument("--kv-cache-memory", default=None, help="tokenmill's KV cache size, e.g. 2GiB")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="tokenmill's batch limit")
    parser.add_argument(
        "--hf-batch-size",
        type=int,
        default=None,
        help="requests per transformers generate() call (default: all in one batch)",
    )
    parser.add_argument("--skip-transformers", action="store_true", help="only run tokenmill")
    parser.add_argument("--json", dest="json_path", default=None, help="write the results to this JSON file")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def run_tokenmill(llm, requests, use_tqdm: bool) -> dict:
    from tokenmill.benchmarks.metrics import compute_metrics
    from tokenmill.benchmarks.throughput import reset_prefix_cache, run_offline, warm_up

    warm_up(llm, 2)
    reset_prefix_cache(llm)
    run = run_offline(llm, requests, use_tqdm=use_tqdm)
    metrics = compute_metrics(run.results, run.duration_s)
    wanted = sum(r.expected_output_len for r in requests)
    if metrics.total_output_tokens != wanted:
        raise RuntimeError(
            f"tokenmill generated {metrics.total_output_tokens} tokens, {wanted} were asked for"
        )
    return {
        "seconds": run.duration_s,
        "output_tokens": metrics.total_output_tokens,
        "output_tok_per_s": metrics.output_throughput,
        "total_tok_per_s": metrics.total_token_throughput,
        "requests_per_s": metrics.request_throughput,
        "engine_stats": run.engine_stats(),
        "metrics": metrics.to_dict(),
    }


def hf_batches(requests, batch_size: int) -> list[list[int]]:
    """Request indices sorted by output length (longest first), cut into batches of batch_size."""
    order = sorted(range(len(requests)), key=lambda i: -requests[i].expected_output_len)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def hf_generate_batch(model, requests, indices: list[int], pad_id: int) -> list[list[int]]:
    """Left-padded greedy generate for one batch; returns each request's first expected_output_len tokens."""
    prompts = [requests[i].prompt_token_ids for i in indices]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # [batch, width]
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    max_new = max(requests[i].expected_output_len for i in indices)
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            do_sample=False,
            pad_token_id=pad_id,
        )
    generated = out[:, width:]  # [batch, max_new]
    return [generated[row, : requests[i].expected_output_len].tolist() for row, i in enumerate(indices)]


def run_transformers(model_dir: Path, dtype: torch.dtype, requests, batch_size: int, use_tqdm: bool) -> dict:
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    model.eval()
    config = model.generation_config
    pad_id = config.pad_token_id if config.pad_token_id is not None else model.config.eos_token_id
    pad_id = pad_id[0] if isinstance(pad_id, list) else int(pad_id or 0)
    # Warm-up: one short batch (first calls pay one-off allocation costs, as tokenmill's warm-up does).
    warm = [requests[0].__class__(requests[0].prompt, requests[0].prompt_token_ids[:16], 4)] * 2
    hf_generate_batch(model, warm, [0, 1], pad_id)
    batches = hf_batches(requests, batch_size)
    outputs: dict[int, list[int]] = {}  # request index -> its counted output tokens
    bar = tqdm(total=len(requests), desc="transformers", unit="req", disable=not use_tqdm)
    start = time.perf_counter()
    for indices in batches:
        for i, tokens in zip(indices, hf_generate_batch(model, requests, indices, pad_id), strict=True):
            outputs[i] = tokens
        bar.update(len(indices))
    seconds = time.perf_counter() - start
    bar.close()
    counted = sum(len(t) for t in outputs.values())
    wanted = sum(r.expected_output_len for r in requests)
    if counted != wanted:
        raise RuntimeError(f"transformers generated {counted} of the {wanted} tokens asked for")
    generated = sum(
        len(indices) * max(requests[i].expected_output_len for i in indices) for indices in batches
    )
    return {
        "seconds": seconds,
        "output_tokens": counted,
        "output_tok_per_s": counted / seconds,
        "tokens_generated_incl_padding_rows": generated,
        "num_batches": len(batches),
        "batch_size": batch_size,
        "first_tokens": {i: t[:1] for i, t in outputs.items()},
    }


def main(argv: list[str] | None = None) -> int:
    from tokenmill import LLM
    from tokenmill.benchmarks.datasets import parse_range, random_requests
    from tokenmill.benchmarks.report import run_header, write_json

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    use_tqdm = not args.no_progress
    llm = LLM(
        args.model,
        dtype=args.dtype,
        kv_cache_memory=args.kv_cache_memory,
        max_num_seqs=args.max_num_seqs,
        seed=args.seed,
    )
    requests = random_requests(
        llm.get_tokenizer(),
        args.num_prompts,
        parse_range(args.input_len),
        parse_range(args.output_len),
        seed=args.seed,
    )
    dtype_name = llm.llm_engine.dtype
    print(
        f"model {llm.llm_engine.model_dir}, dtype {dtype_name}, {torch.get_num_threads()} threads, "
        f"{len(requests)} requests, {sum(r.prompt_len for r in requests)} prompt tokens, "
        f"{sum(r.expected_output_len for r in requests)} output tokens"
    )

    result = run_header("offline_throughput")
    result.update(
        model=str(llm.llm_engine.model_dir),
        dtype=dtype_name,
        threads=torch.get_num_threads(),
        dataset={
            "num_prompts": len(requests),
            "input_len": args.input_len,
            "output_len": args.output_len,
            "seed": args.seed,
            "total_prompt_tokens": sum(r.prompt_len for r in requests),
            "total_output_tokens": sum(r.expected_output_len for r in requests),
        },
    )
    result["tokenmill"] = run_tokenmill(llm, requests, use_tqdm)
    print(
        f"tokenmill:    {result['tokenmill']['output_tok_per_s']:9.1f} output tok/s "
        f"({result['tokenmill']['seconds']:.1f} s)"
    )
    if not args.skip_transformers:
        batch_size = args.hf_batch_size or len(requests)
        hf = run_transformers(llm.llm_engine.model_dir, getattr(torch, dtype_name), requests, batch_size, use_tqdm)
        # Greedy first tokens should mostly agree (same prompts; low precision can flip near-ties).
        first_ok = sum(1 for i, r in enumerate(requests) if hf["first_tokens"][i] == _tokenmill_first(llm, r))
        del hf["first_tokens"]
        hf["first_token_agreement"] = first_ok / len(requests)
        result["transformers"] = hf
        ratio = result["tokenmill"]["output_tok_per_s"] / hf["output_tok_per_s"]
        result.update(ratio=ratio, target_ratio=TARGET_RATIO, meets_target=ratio >= TARGET_RATIO)
        print(
            f"transformers: {hf['output_tok_per_s']:9.1f} output tok/s ({hf['seconds']:.1f} s, "
            f"{hf['num_batches']} batch(es) of up to {batch_size}; greedy first tokens agree on "
            f"{100 * hf['first_token_agreement']:.0f}% of requests)"
        )
        print(
            f"ratio:        {ratio:9.2f}x "
            f"(target >= {TARGET_RATIO:g}x: {'met' if ratio >= TARGET_RATIO else 'MISSED'})"
        )
    if args.json_path:
        print(f"Results written to {write_json(args.json_path, result)}")
    return 0


def _tokenmill_first(llm, request) -> list[int]:
    """tokenmill's greedy first output token for one request (a separate 1-token generate)."""
    from tokenmill import SamplingParams

    out = llm.generate(
        [{"prompt_token_ids": request.prompt_token_ids}],
        SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
        use_tqdm=False,
    )
    return list(out[0].outputs[0].token_ids[:1])


if __name__ == "__main__":
    sys.exit(main())
