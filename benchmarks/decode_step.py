"""Where a small-batch decode step's time goes, and the fused decode step (kernels/cpu/decode.py) against the
op-by-op path, side by side in one run on one engine.

    python benchmarks/decode_step.py                          # bundled model (Q4_1 kept packed), batch 1
    python benchmarks/decode_step.py --batch 1,4 --rounds 3 --tokens 128 --json out.json
    python benchmarks/decode_step.py --step-threads 1,2,auto    # the fused step on 1 thread, 2, and as chosen

Each round runs the same requests (a chat prompt, `--tokens` greedy tokens each, end-of-sequence ignored) with
the fused step at each of `--step-threads` (its parallel region on that many threads; auto: as the engine runs
it, ThreadChooser measuring), then op by op (the same loaded model: LlamaForCausalLM.fused_decoder switched off and back), so
both see the same machine load; the ratio of each round is reported, then the medians. For each, the engine's
own step timing (EngineCore.set_step_timing) splits a decode step into:
  forward   the decoder layers (the part the fused step replaces; with a packed output layer, as the bundled
            model's Q8_0 one, the fused step computes the logits inside it too)
  logits    the output layer (LM head): near zero for fused steps that computed them
  sample    the sampler
  host      the rest of LLMEngine.step: scheduling, batch building, state updates, detokenizing, outputs

Then the forward is split further, with the kernels called alone on the model's own weights:
  matmuls    the decoder's packed GEMVs back to back (the weight bytes streamed; their effective GB/s is shown),
             and the same with quant.c's float32 int4_gemm in place of int4_gemv_bf16 (what ran before it)
  attention  the decode attention kernel over a cache of the same length, every layer
  the rest   of the fused forward: norms, rotary, KV write, activation, and the call itself; of the op-by-op
             forward: the same plus Python dispatch (~10 calls a layer with their argument checks).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# tokenmill before torch (functions below import torch): it sets the OpenMP wait policy a shared CPU needs.
import tokenmill  # noqa: E402, F401
from benchmarks.gpu.engine_hooks import StepTimers  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle. Describe the sea."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory or .gguf (default: the bundled model)")
    p.add_argument("--quantization", default=None,
                   help="vLLM's --quantization (int8 / int4 quantize a full-precision checkpoint at load)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--batch", default="1", help="comma-separated numbers of concurrent requests")
    p.add_argument("--tokens", type=int, default=128, help="output tokens of each request")
    p.add_argument("--rounds", type=int, default=3, help="fused / op-by-op pairs per batch size")
    p.add_argument("--context", type=int, default=0,
                   help="positions attended in the kernels-alone attention timing (default: the runs' mean)")
    p.add_argument("--step-threads", default="auto",
                   help="comma-separated thread counts of the fused step's parallel region, or auto (the "
                        "engine's measured choice); the first is the one compared with op by op")
    p.add_argument("--json", dest="json_path", default=None)
    return p.parse_args(argv)


def run_requests(llm, prompt_ids: list[int], batch: int, tokens: int) -> dict:
    """Median stages (ms) of the decode steps of `batch` requests run together."""
    from tokenmill import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{time.monotonic_ns()}-{i}", list(prompt_ids), params)
    timers = StepTimers(engine, final_only=True)
    with timers:
        while engine.has_unfinished_requests():
            timers.step()
    decode = [(s, t) for s, t in zip(timers.engine_steps, timers.timings, strict=True)
              if t.num_scheduled_tokens == batch and t.forward > 0]

    def med(values: list[float]) -> float:
        return statistics.median(values) * 1e3

    step = med([s for s, _ in decode])
    forward, logits, sample = (med([getattr(t, k) for _, t in decode]) for k in ("forward", "logits", "sample"))
    host = med([s - t.forward - t.logits - t.sample for s, t in decode])
    return {"step_ms": step, "forward_ms": forward, "logits_ms": logits, "sample_ms": sample, "host_ms": host,
            "tok_s": batch / step * 1e3, "num_decode_steps": len(decode)}


def kernels_alone(model, batch: int, context: int, repeat: int = 20) -> dict:
    """ms of the decoder's packed GEMVs and of decode attention (every layer) called alone on the model's weights."""
    import torch

    from tokenmill.kernels.cpu import ops
    from tokenmill.kernels.cpu.decode import packed_kernel

    lib = ops._library()
    kernels = [packed_kernel(linear) for layer in model.layers
               for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                              layer.mlp.down_proj)]
    if any(k is None for k in kernels):
        return {}
    dtype = model.norm.weight.dtype  # the activations': bfloat16, or float32 (--dtype auto without native bf16)
    code = {torch.float32: 0, torch.bfloat16: 1}[dtype]
    xs = {k.in_features: torch.randn(batch, k.in_features).to(dtype) for k in kernels}
    from tokenmill.kernels.cpu.quant import Int4Weight, _threads

    def gemvs(chosen: list, float32_int4: bool = False) -> None:
        """Int4Weight / Int8Weight._packed_gemm (what both paths run), or with float32_int4 quant.c's int4_gemm,
        the float32-FMA kernel that ran int4 weights before int4_gemv_bf16."""
        for k in chosen:
            x, out = xs[k.in_features], outs[id(k)]
            threads = _threads(batch, k.out_features, k.in_features)
            if float32_int4 and isinstance(k, Int4Weight):
                lib.int4_gemm(x.data_ptr(), code, x.stride(0), k.packed.data_ptr(), k.scales.data_ptr(),
                              k.offsets.data_ptr(), k.group, out.data_ptr(), out.stride(0), batch, k.out_features,
                              k.in_features, threads)
            else:
                k._packed_gemm(x, out, batch, threads)

    outs = {id(k): torch.empty(batch, k.out_features, dtype=dtype) for k in kernels}
    shapes: dict[tuple[int, int], list] = {}  # (N, K) -> that projection's kernel in every layer
    for k in kernels:
        shapes.setdefault((k.out_features, k.in_features), []).append(k)

    spec = model.spec
    block_size = 16
    num_blocks = batch * (-(-context // block_size)) + 1
    cache = torch.randn(2, num_blocks, block_size, spec.num_kv_heads, spec.head_dim).to(dtype)
    tables = torch.arange(1, num_blocks, dtype=torch.int32).reshape(batch, -1)
    seq_lens = torch.full((batch,), context, dtype=torch.int32)
    q = torch.randn(batch, spec.num_heads, spec.head_dim).to(dtype)
    out = torch.empty_like(q)
    from tokenmill.kernels.cpu.decode import MIN_PARALLEL_ATTENTION

    threads = 1 if batch * context * spec.num_heads * spec.head_dim < MIN_PARALLEL_ATTENTION else torch.get_num_threads()

    def attention(num_threads: int = threads) -> None:
        for _ in range(spec.num_layers):
            lib.paged_decode_attention(q.data_ptr(), cache.data_ptr(), out.data_ptr(), tables.data_ptr(),
                                       seq_lens.data_ptr(), batch, spec.num_heads, spec.num_kv_heads, spec.head_dim,
                                       block_size, tables.shape[1], num_blocks, ctypes.c_float(0.125), 0, code,
                                       num_threads, 1)

    def median_ms(fn, *args) -> float:
        fn(*args)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    per_shape = {}
    for (n, k), chosen in shapes.items():
        nbytes = sum(w.nbytes for w in chosen)
        now, before = median_ms(gemvs, chosen), median_ms(gemvs, chosen, True)
        per_shape[f"{n}x{k}"] = {"kernel": type(chosen[0]).__name__, "layers": len(chosen), "mb": nbytes / 1e6,
                                 "ms": now, "gb_s": nbytes / now / 1e6, "float32_int4_gemm_ms": before}
    matmul_ms = median_ms(gemvs, kernels)
    weight_bytes = sum(k.nbytes for k in kernels)
    return {"matmuls_ms": matmul_ms, "decoder_weight_mb": weight_bytes / 1e6,
            "matmul_gb_s": weight_bytes / matmul_ms / 1e6, "float32_int4_gemm_ms": median_ms(gemvs, kernels, True),
            "per_shape": per_shape, "attention_ms": median_ms(attention), "attention_threads": threads,
            "attention_ms_by_threads": {n: median_ms(attention, n) for n in sorted({1, torch.get_num_threads()})},
            "context": context}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from tokenmill import LLM

    llm = LLM(args.model, show_progress=False, max_model_len=args.max_model_len, quantization=args.quantization)
    model = llm.llm_engine.core.executor.worker.model
    fused = model.fused_decoder
    if fused is None:
        sys.exit("the fused decode step does not apply to this model (the log says why at debug level); "
                 "TOKENMILL_FUSED_DECODE=0 turns it off")
    prompt_ids = llm.get_tokenizer().encode(PROMPT)
    results: dict = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "prompt_tokens": len(prompt_ids),
                     "tokens": args.tokens, "batches": {}}
    run_requests(llm, prompt_ids, 1, 8)  # warm up both paths
    model.fused_decoder = None
    run_requests(llm, prompt_ids, 1, 8)
    model.fused_decoder = fused
    settings = [s.strip() for s in args.step_threads.split(",")]
    results["step_threads"] = settings
    for batch in (int(b) for b in args.batch.split(",")):
        rounds = []
        for _ in range(args.rounds):
            model.fused_decoder = fused
            by_threads = {}
            for setting in settings:
                fused.step_threads = None if setting == "auto" else int(setting)
                by_threads[setting] = run_requests(llm, prompt_ids, batch, args.tokens)
            fused.step_threads = None
            a = by_threads[settings[0]]
            model.fused_decoder = None
            b = run_requests(llm, prompt_ids, batch, args.tokens)
            model.fused_decoder = fused
            rounds.append({"fused": a, "op_by_op": b, "ratio": a["tok_s"] / b["tok_s"],
                           "fused_by_step_threads": by_threads})
            print(f"batch {batch}: fused " + ", ".join(f"{v['tok_s']:.1f} tok/s (forward {v['forward_ms']:.2f} ms) "
                                                      f"on {k} thread(s)" for k, v in by_threads.items())
                  + f"; op by op {b['tok_s']:.1f} tok/s (forward {b['forward_ms']:.2f} ms), "
                  f"ratio {rounds[-1]['ratio']:.2f}x", flush=True)
        context = args.context or len(prompt_ids) + args.tokens // 2
        results["batches"][batch] = {"rounds": rounds, "kernels_alone": kernels_alone(model, batch, context)}

    print(f"\n{results['date']}, {results['machine']}, {results['threads']} threads, prompt {len(prompt_ids)} "
          f"tokens + {args.tokens} generated, medians of the decode steps of each run (ms)\n")
    print("| batch | path | tok/s | step | forward | logits | sample | host | fused / op-by-op |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for batch, entry in results["batches"].items():
        for i, r in enumerate(entry["rounds"]):
            for name in ("fused", "op_by_op"):
                s = r[name]
                ratio = f"{r['ratio']:.2f}x" if name == "fused" else ""
                print(f"| {batch} | {name.replace('_', ' ')} (round {i + 1}) | {s['tok_s']:.1f} | {s['step_ms']:.2f} | "
                      f"{s['forward_ms']:.2f} | {s['logits_ms']:.2f} | {s['sample_ms']:.2f} | {s['host_ms']:.2f} | "
                      f"{ratio} |")
    if len(settings) > 1:
        print(f"\nThe fused step by threads of its parallel region (forward ms, median of each run's decode steps; "
              f"ratio: against {settings[0]})\n")
        print("| batch | round | " + " | ".join(f"{s} thread(s)" for s in settings) + " | "
              + " | ".join(f"speed-up of {s}" for s in settings[1:]) + " |")
        print("|---:|---:|" + "---:|" * (2 * len(settings) - 1))
        for batch, entry in results["batches"].items():
            for i, r in enumerate(entry["rounds"]):
                f = r["fused_by_step_threads"]
                base = f[settings[0]]["forward_ms"]
                print(f"| {batch} | {i + 1} | " + " | ".join(f"{f[s]['forward_ms']:.2f}" for s in settings) + " | "
                      + " | ".join(f"{base / f[s]['forward_ms']:.2f}x" for s in settings[1:]) + " |")
    print()
    for batch, entry in results["batches"].items():
        k = entry["kernels_alone"]
        if k:
            print(f"batch {batch}, kernels alone: decoder GEMVs {k['matmuls_ms']:.2f} ms "
                  f"({k['decoder_weight_mb']:.1f} MB, {k['matmul_gb_s']:.1f} GB/s; with int4_gemm's float32 FMA "
                  f"instead of int4_gemv_bf16: {k['float32_int4_gemm_ms']:.2f} ms), decode attention over every "
                  f"layer at {k['context']} positions {k['attention_ms']:.2f} ms ({k['attention_threads']} thread(s); "
                  + ", ".join(f"{ms:.2f} ms on {n}" for n, ms in k["attention_ms_by_threads"].items()) + ")")
            print("\n| weight [N, K] (every layer) | kernel | MB | int4_gemm (float32 FMA) ms | now ms | GB/s now | speed-up |")
            print("|---|---|---:|---:|---:|---:|---:|")
            for shape, v in k["per_shape"].items():
                print(f"| {shape} x{v['layers']} | {v['kernel']} | {v['mb']:.1f} | {v['float32_int4_gemm_ms']:.2f} | "
                      f"{v['ms']:.2f} | {v['gb_s']:.1f} | {v['float32_int4_gemm_ms'] / v['ms']:.2f}x |")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
