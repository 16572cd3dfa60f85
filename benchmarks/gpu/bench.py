"""tokenmill on one GPU: kernel checks, copy bandwidth, decode step time against the bandwidth roofline, the
nano-vllm workload against transformers' generate, and the CPU side's share of a step.

Run through benchmarks/gpu/run.sh on the lent machine (no installs: it uses the image's torch, triton and
transformers, and this repository on PYTHONPATH). Full results go to <out>/gpu_bench.json after every
section, so a run cut short still leaves what it measured; a short table is printed last.

    benchmarks/gpu/run.sh                      # everything, about 5-8 minutes on an H100
    benchmarks/gpu/run.sh --skip hf,workload   # sections to leave out
    benchmarks/gpu/run.sh --tiny               # CPU smoke run with tiny models (no GPU needed)

Sections: env, bandwidth, checks (attention, layer ops, quantized GEMMs: AWQ / GPTQ / act-order / 8-bit
Triton GEMMs and fp8 _scaled_mm against bf16 cuBLAS), then per model (qwen2.5-0.5b first, llama-3.1-8b last): memory (KV sizing
by profiling vs the planner), decode (batch 1 and 64), overhead (batch 256), and for the workload model:
workload (tokenmill) and hf (transformers). The model runs as the engine runs it on CUDA: Triton attention,
the fused layer ops (RMSNorm with the residual add, rotary, SiLU-and-multiply) and CUDA graphs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import random
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

SECTIONS = ("checks", "bandwidth", "memory", "decode", "overhead", "workload", "hf")
# Targets of the issue: (metric, comparison, bound).
TARGET_ROOFLINE_B1 = 0.75  # batch-1 decode of the 8B-shaped model, fraction of the bandwidth roofline
TARGET_SPEEDUP = 10.0  # nano-vllm workload, tokenmill over transformers' generate
TARGET_CPU_SHARE = 0.15  # CPU-side share of a step at batch 256


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "gpu" / "results"),
                   help="folder for gpu_bench.json (default: $OUT, else benchmarks/gpu/results)")
    p.add_argument("--models-dir", default="/tmp/tokenmill-bench-models",
                   help="where the random-weight models are written (reused when present)")
    p.add_argument("--models", default="qwen2.5-0.5b,llama-3.1-8b", help="comma-separated model shapes")
    p.add_argument("--workload-model", default="qwen2.5-0.5b", help="model for the nano-vllm workload")
    p.add_argument("--skip", default="", help=f"comma-separated sections to skip: {','.join(SECTIONS)}")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny models and workloads")
    p.add_argument("--kv-cache-memory", default="40GiB")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--context", type=int, default=512, help="prompt tokens before the timed decode steps")
    p.add_argument("--decode-steps", type=int, default=30)
    p.add_argument("--num-seqs", type=int, default=256, help="requests of the nano-vllm workload")
    p.add_argument("--hf-batch", type=int, default=256, help="sequences per transformers generate call")
    p.add_argument("--hf-time-limit", type=float, default=90.0, help="seconds transformers may generate")
    p.add_argument("--time-budget", type=float, default=560.0,
                   help="seconds for the whole run; later sections are skipped when it runs out")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    args = p.parse_args(argv)
    args.skip = {s for s in args.skip.split(",") if s}
    unknown = args.skip - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}: choose from {', '.join(SECTIONS)}")
    if args.tiny:
        args.models, args.workload_model = "tiny-qwen2,tiny-llama", "tiny-qwen2"
        args.kv_cache_memory = "256MiB"
        args.context, args.decode_steps, args.num_seqs, args.hf_batch = 24, 4, 8, 8
        args.max_num_batched_tokens = 512
        args.models_dir = args.models_dir + "-tiny"
    return args


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args = args
        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
        self.cuda = self.device.type == "cuda"
        self.start = time.perf_counter()
        self.out_dir = Path(args.out)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.results: dict = {"args": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()}}
        self.copy_bw: float | None = None

    # ---- plumbing -----------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        return self.args.time_budget - self.elapsed()

    def save(self) -> None:
        self.results["elapsed_s"] = round(self.elapsed(), 1)
        path = self.out_dir / "gpu_bench.json"
        path.write_text(json.dumps(self.results, indent=2, default=str))

    def section(self, key: str, fn, *fn_args, need_s: float = 0.0, store: dict | None = None):
        """Run one section, recording its result or its error; never lets one failure stop the rest."""
        store = self.results if store is None else store
        name = key.split(":")[0]
        if name in self.args.skip:
            return None
        if self.remaining() < need_s:
            store[key] = {"skipped": f"time budget: {self.remaining():.0f} s left, needs ~{need_s:.0f} s"}
            self.save()
            return None
        log(f"== {key} ({self.elapsed():.0f} s elapsed)")
        t0 = time.perf_counter()
        try:
            value = fn(*fn_args)
        except Exception as e:  # a benchmark records the failure and goes on
            traceback.print_exc()
            value = {"error": f"{type(e).__name__}: {e}"}
        if isinstance(value, dict):
            value["section_seconds"] = round(time.perf_counter() - t0, 1)
        store[key] = value
        self.save()
        return value

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    # ---- env ----------------------------------------------------------------------------------------------
    def env(self) -> dict:
        torch = self.torch
        info = {
            "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "device": str(self.device),
        }
        for mod in ("triton", "transformers"):
            with contextlib.suppress(ImportError):
                info[mod] = __import__(mod).__version__
        if self.cuda:
            props = torch.cuda.get_device_properties(self.device)
            info.update(gpu=props.name, sm_count=props.multi_processor_count,
                        gpu_memory_gib=round(props.total_memory / 2**30, 1),
                        cuda=torch.version.cuda)
        return info

    # ---- 1. kernels against the reference ------------------------------------------------------------------
    def checks(self) -> dict:
        from benchmarks.gpu.checks import (
            check_cuda_graph_replay,
            check_kernels,
            check_layer_ops,
            kernel_timings,
        )
        from benchmarks.gpu.quant import check_quant_gemms, quant_timings

        out = {"cases": check_kernels(self.device) + (check_layer_ops(self.device) if self.cuda else [])
               + check_quant_gemms(self.device)}
        out["passed"] = sum(c["ok"] for c in out["cases"])
        out["total"] = len(out["cases"])
        if self.cuda:
            out["cuda_graph"] = check_cuda_graph_replay(self.device)
            out["timings"] = kernel_timings(self.device, self.copy_bw)
            out["quant_timings"] = quant_timings(self.device, self.copy_bw)
        return out

    # ---- 4(a). copy bandwidth ------------------------------------------------------------------------------
    def bandwidth(self) -> dict:
        torch = self.torch
        nbytes = (1 << 30) if self.cuda else (1 << 26)
        src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        times = []
        for i in range(25):
            self.sync()
            t0 = time.perf_counter()
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                dst.copy_(src)
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) / 1e3
            else:
                dst.copy_(src)
                seconds = time.perf_counter() - t0
            if i >= 5:  # warm-up
                times.append(seconds)
        assert torch.equal(dst[:4096], src[:4096])
        median = statistics.median(times)
        self.copy_bw = 2 * nbytes / median  # bytes read + bytes written
        return {"bytes_per_copy": nbytes, "median_ms": median * 1e3, "copy_bandwidth_GBps": self.copy_bw / 1e9}

    # ---- models and engines -----------------------------------------------------------------------------
    def model_dir(self, name: str) -> Path:
        from benchmarks.gpu.models import build_random_model

        t0 = time.perf_counter()
        path = build_random_model(name, Path(self.args.models_dir), device=str(self.device))
        log(f"model {name} at {path} ({time.perf_counter() - t0:.1f} s)")
        return path

    def open_engine(self, path: Path, max_num_seqs: int, max_model_len: int, max_num_batched_tokens: int):
        from tokenmill import LLM

        t0 = time.perf_counter()
        llm = LLM(str(path), dtype="bfloat16" if self.cuda else "float32", kv_cache_memory=self.args.kv_cache_memory,
                  max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                  max_model_len=max_model_len, device=self.device.type, show_progress=False,
                  enforce_eager=self.args.enforce_eager)
        facts = llm.llm_engine.engine_info()
        capture_s = facts["graph_capture_seconds"]
        info = {"load_s": round(time.perf_counter() - t0, 1),
                "attention_backend": facts["attention_backend"],
                "num_kv_blocks": facts["num_kv_blocks"],
                "cuda_graph_sizes": facts["cuda_graph_sizes"],
                "graph_capture_s": None if capture_s is None else round(capture_s, 1)}
        return llm, info

    # ---- 3. KV cache sizing by profiling, beside the planner -------------------------------------------------
    def memory(self, path: Path) -> dict:
        """What profile_kv_cache sizes for this model at gpu_memory_utilization 0.9 and 8192 batched tokens, and
        the planner's prediction for the same settings (the model is loaded on its own, before any KV cache)."""
        from tokenmill.attention.triton_backend import TritonAttentionBackend
        from tokenmill.model.loader import load_model, read_hf_config
        from tokenmill.model.registry import DecoderSpec
        from tokenmill.planner.arch import ModelArch
        from tokenmill.planner.memory import kv_cache_bytes_per_block
        from tokenmill.worker.gpu_memory import profile_kv_cache

        torch = self.torch
        self.free()
        hf_config = read_hf_config(path)
        spec = DecoderSpec.from_hf_config(hf_config)
        backend = TritonAttentionBackend(spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.head_dim**-0.5,
                                         spec.sliding_window)
        model = load_model(path, backend, torch.bfloat16, self.device, 4096, show_progress=False)
        block_size, tokens = 16, self.args.max_num_batched_tokens
        bytes_per_block = kv_cache_bytes_per_block(ModelArch.from_hf_config(hf_config), block_size, torch.bfloat16)
        profile = profile_kv_cache(
            model, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, num_layers=spec.num_layers,
            dtype=torch.bfloat16, device=self.device, block_size=block_size, bytes_per_block=bytes_per_block,
            max_num_batched_tokens=tokens, max_num_seqs=256, gpu_memory_utilization=0.9, hf_config=hf_config,
        )
        del model
        self.free()
        return profile.as_dict() | {"log_line": profile.log_line()}

    # ---- 4(b). decode step time against the roofline ----------------------------------------------------
    def decode(self, llm, batch: int) -> dict:
        engine = llm.llm_engine
        facts = engine.engine_info()
        children, parents = self._start_requests(llm, batch, self.args.context)
        # Tokens each sequence attends over: its prompt and outputs so far, one more per step.
        start_tokens = sum(self.args.context + len(c.output_token_ids) for c in children)
        seq_tokens = [start_tokens + i * len(children) for i in range(self.args.decode_steps)]
        engine.set_step_timing(True)
        try:
            for _ in seq_tokens:
                engine.step(final_only=True)
            # The engine core's step (schedule, run, update; it waits for the GPU), without output processing.
            times = [t.step for t in engine.take_step_timings()]
        finally:
            engine.set_step_timing(False)
        engine.abort_request([p.request_id for p in parents])
        step_s = statistics.median(times)
        weights = facts["weight_bytes_read_per_step"]
        kv = facts["kv_bytes_per_token"] * statistics.mean(seq_tokens)
        result = {"batch": batch, "context": self.args.context, "median_step_ms": step_s * 1e3,
                  "min_step_ms": min(times) * 1e3, "weight_bytes": weights, "kv_bytes": kv,
                  "tokens_per_s": batch / step_s}
        if self.copy_bw:
            floor = (weights + kv) / self.copy_bw
            result.update(roofline_ms=floor * 1e3, fraction_of_roofline=floor / step_s)
        return result

    def _start_requests(self, llm, batch: int, context: int):
        """Add `batch` requests of `context` random prompt tokens and step until every one is decoding."""
        from tokenmill import SamplingParams

        engine = llm.llm_engine
        rng = random.Random(batch)
        vocab = engine.vocab_size
        max_tokens = engine.max_model_len - context
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
        parents = [engine.add_request(engine.next_request_id(),
                                      {"prompt_token_ids": [rng.randrange(vocab) for _ in range(context)]}, params)
                   for _ in range(batch)]
        children = [c for p in parents for c in p.children]
        while not all(c.output_token_ids for c in children):  # every prompt computed: each sampled a token
            engine.step()
        for _ in range(3):  # warm-up decode steps
            engine.step()
        return children, parents

    # ---- 4(d). CPU side as a share of the step ------------------------------------------------------------
    def overhead(self, llm, batch: int, async_scheduling: bool = False) -> dict:
        """Consumed as LLM.generate consumes steps (outputs built for finished requests only)."""
        from benchmarks.gpu.engine_hooks import StepTimers

        engine = llm.llm_engine
        engine.set_async_scheduling(async_scheduling)
        try:
            _, parents = self._start_requests(llm, batch, self.args.context)
            timers = StepTimers(engine, final_only=True)
            with timers:
                for _ in range(self.args.decode_steps):
                    timers.step()
            engine.abort_request([p.request_id for p in parents])
        finally:
            engine.set_async_scheduling(False)
        return {"batch": batch, "context": self.args.context, "async_scheduling": async_scheduling,
                **timers.summary()}

    # ---- 4(c). nano-vllm's workload -------------------------------------------------------------------------
    def workload_requests(self, vocab: int) -> tuple[list[list[int]], list[int]]:
        """nano-vllm's bench.py: seed 0, prompts of randint(100, 1024) ids in [0, 10000], then output lengths
        randint(100, 1024), 256 sequences (same order of random draws)."""
        random.seed(0)
        n, lo, hi = self.args.num_seqs, 100, 1024
        top = 10000
        if self.args.tiny:
            lo, hi, top = 10, 40, vocab - 1
        prompts = [[random.randint(0, top) for _ in range(random.randint(lo, hi))] for _ in range(n)]
        max_tokens = [random.randint(lo, hi) for _ in range(n)]
        return prompts, max_tokens

    def workload(self, llm, async_scheduling: bool = False) -> dict:
        engine = llm.llm_engine
        engine.set_async_scheduling(async_scheduling)
        try:
            return self._workload(llm) | {"async_scheduling": async_scheduling}
        finally:
            engine.set_async_scheduling(False)

    def _workload(self, llm) -> dict:
        from tokenmill import SamplingParams

        prompts, max_tokens = self.workload_requests(llm.llm_engine.vocab_size)
        engine = llm.llm_engine
        llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
        before = engine.scheduler_stats
        params = [SamplingParams(max_tokens=m, ignore_eos=True, temperature=0) for m in max_tokens]
        self.sync()
        t0 = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
        if generated != sum(max_tokens):
            raise RuntimeError(f"generated {generated} tokens, asked for {sum(max_tokens)}")
        return {"num_seqs": len(prompts), "input_tokens": sum(map(len, prompts)), "output_tokens": generated,
                "seconds": seconds, "output_tok_per_s": generated / seconds,
                "num_steps": engine.scheduler_stats.num_steps - before.num_steps,
                "busy_seconds": engine.scheduler_stats.busy_seconds - before.busy_seconds}

    def hf_generate(self, path: Path) -> dict:
        """transformers' generate on the same requests: batches of --hf-batch, left-padded, greedy, each batch
        run to its longest output; tokens past a sequence's own length are not counted. Stops at
        --hf-time-limit (max_time) and reports the throughput of what it generated by then."""
        import transformers

        torch = self.torch
        prompts, max_tokens = self.workload_requests(10**9)
        dtype = torch.bfloat16 if self.cuda else torch.float32
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(self.device).eval()
        if self.args.tiny:
            prompts, max_tokens = self.workload_requests(model.config.vocab_size)
        # Warm-up: kernels and allocator.
        model.generate(torch.tensor([[1, 2, 3]], device=self.device), max_new_tokens=4, do_sample=False,
                       pad_token_id=0)
        limit = min(self.args.hf_time_limit, max(10.0, self.remaining() - 60))
        useful, batches, truncated = 0, 0, False
        self.sync()
        t0 = time.perf_counter()
        for start in range(0, len(prompts), self.args.hf_batch):
            left = limit - (time.perf_counter() - t0)
            if left <= 0:
                truncated = True
                break
            chunk, lens = prompts[start : start + self.args.hf_batch], max_tokens[start : start + self.args.hf_batch]
            width = max(map(len, chunk))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=self.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=self.device)
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=mask, max_new_tokens=max(lens), min_new_tokens=max(lens),
                                     do_sample=False, pad_token_id=0, max_time=left)
            steps = out.shape[1] - width
            truncated |= steps < max(lens)
            useful += sum(min(m, steps) for m in lens)
            batches += 1
        self.sync()
        seconds = time.perf_counter() - t0
        del model
        self.free()
        return {"batch": self.args.hf_batch, "batches_run": batches, "output_tokens": useful, "seconds": seconds,
                "output_tok_per_s": useful / seconds, "truncated_by_time_limit": truncated,
                "transformers": transformers.__version__}

    # ---- per model ------------------------------------------------------------------------------------------
    def run_model(self, name: str) -> None:
        store = self.results.setdefault("models", {}).setdefault(name, {})
        path = self.model_dir(name)
        wants_workload = name == self.args.workload_model
        skip = self.args.skip
        if self.cuda:
            self.section("memory", self.memory, path, need_s=90 if "8b" in name else 30, store=store)
        if not {"decode", "overhead"} <= skip or (wants_workload and "workload" not in skip):
            tiny = self.args.tiny
            max_len = 256 if tiny else max(2048, self.args.context + self.args.decode_steps + 64)
            tokens = 16384 if wants_workload and not tiny else self.args.max_num_batched_tokens
            llm, store["engine"] = self.open_engine(path, max_num_seqs=256, max_model_len=max_len,
                                                    max_num_batched_tokens=tokens)
            self.save()
            vstore = store.setdefault("engine_runs", {})
            for batch in (1, 64):
                self.section(f"decode:b{batch}", self.decode, llm, batch, need_s=20, store=vstore)
            batch = 16 if tiny else 256
            self.section("overhead:b256", self.overhead, llm, batch, need_s=30, store=vstore)
            self.section("overhead:b256:async", self.overhead, llm, batch, True, need_s=30, store=vstore)
            if wants_workload:
                self.section("workload", self.workload, llm, need_s=60, store=vstore)
                self.section("workload:async", self.workload, llm, True, need_s=60, store=vstore)
            del llm
            self.free()
        if wants_workload:
            self.section("hf", self.hf_generate, path, need_s=40, store=store)

    def run(self) -> None:
        self.results["env"] = self.env()
        self.save()
        self.section("bandwidth", self.bandwidth)
        self.section("checks", self.checks, need_s=30)
        for name in self.args.models.split(","):
            need = 150 if "8b" in name else 40
            if self.remaining() < need:
                self.results.setdefault("models", {})[name] = {"skipped": "time budget"}
                continue
            try:
                self.run_model(name)
            except Exception as e:
                traceback.print_exc()
                self.results.setdefault("models", {}).setdefault(name, {})["error"] = f"{type(e).__name__}: {e}"
            self.free()
        try:
            self.results["summary"] = summarize(self.results, self.args.workload_model)
        except Exception as e:  # the JSON holds everything; a table bug must not hide it
            traceback.print_exc()
            self.results["summary"] = [{"metric": "summary", "value": repr(e), "target": "", "verdict": "FAIL"}]
        self.save()
        print_table(self.results, self.out_dir / "gpu_bench.json")


# ---- reporting -------------------------------------------------------------------------------------------


def summarize(results: dict, workload_model: str) -> list[dict]:
    """Rows of the final table: metric, value, target, verdict."""
    rows = []

    def add(metric: str, value, target: str = "", ok: bool | None = None) -> None:
        rows.append({"metric": metric, "value": value, "target": target,
                     "verdict": "" if ok is None else ("PASS" if ok else "FAIL")})

    bw = results.get("bandwidth", {}).get("copy_bandwidth_GBps")
    if bw:
        add("copy bandwidth (read+write)", f"{bw:.0f} GB/s")
    checks = results.get("checks", {})
    if "total" in checks:
        add("kernel checks vs torch reference", f"{checks['passed']}/{checks['total']}",
            "all", checks["passed"] == checks["total"])
        graph = checks.get("cuda_graph", {})
        if "ok" in graph:
            add("cuda graph replay == eager", f"rel err {graph['rel_error']:.1e}", "< 1e-2", graph["ok"])
    for key, entry in checks.get("quant_timings", {}).items():
        if key.endswith("M=1") or key.endswith("M=256"):
            ms = entry.get("quant_ms", entry.get("fp8_ms"))
            frac = entry.get("fraction_of_copy_bandwidth")
            add(key, f"{ms:.3f} ms, {entry['speedup_vs_bf16']:.2f}x bf16"
                + (f", {frac:.0%} of copy bandwidth" if frac else ""))
    for name, model in results.get("models", {}).items():
        big = "8b" in name
        v, label = model.get("engine_runs", {}), name
        for batch in (1, 64):
            d = v.get(f"decode:b{batch}", {})
            if "median_step_ms" in d:
                frac = d.get("fraction_of_roofline")
                value = f"{d['median_step_ms']:.2f} ms" + (f", {frac:.0%} of roofline" if frac else "")
                target, ok = ("", None)
                if big and batch == 1 and frac is not None:
                    target, ok = f">= {TARGET_ROOFLINE_B1:.0%}", frac >= TARGET_ROOFLINE_B1
                add(f"{label} decode b{batch}", value, target, ok)
        for mode in ("", ":async"):
            o = v.get(f"overhead:b256{mode}", {})
            if "cpu_share" in o:
                add(f"{label} CPU share of step b{o['batch']}{mode}",
                    f"{o['cpu_share']:.1%} of {o['step_ms']:.1f} ms", f"< {TARGET_CPU_SHARE:.0%}",
                    o["cpu_share"] < TARGET_CPU_SHARE)
        hf = model.get("hf", {})
        for mode in ("", ":async"):
            w = v.get(f"workload{mode}", {})
            if "output_tok_per_s" in w:
                add(f"{label} nano-vllm workload{mode}", f"{w['output_tok_per_s']:.0f} tok/s")
                if "output_tok_per_s" in hf:
                    ratio = w["output_tok_per_s"] / hf["output_tok_per_s"]
                    add(f"{label} tokenmill{mode} / transformers", f"{ratio:.1f}x", f">= {TARGET_SPEEDUP:.0f}x",
                        ratio >= TARGET_SPEEDUP)
        for key, value in v.items():
            if isinstance(value, dict) and ("error" in value or "skipped" in value):
                add(f"{label} {key}", value.get("error") or value.get("skipped"), "",
                    False if "error" in value else None)
        mem = model.get("memory", {})
        if "num_blocks" in mem:
            def gib(x) -> str:
                return "?" if x is None else f"{x / 2**30:.2f}"

            add(f"{name} KV blocks by profile (planner)", f"{mem['num_blocks']} ({mem['planned_num_blocks']}); act "
                f"{gib(mem['activation_peak_bytes'])} ({gib(mem['planned_activation_peak_bytes'])}) GiB")
        hf = model.get("hf", {})
        if "output_tok_per_s" in hf:
            add(f"{name} nano-vllm workload, transformers", f"{hf['output_tok_per_s']:.0f} tok/s"
                + (" (time-limited)" if hf.get("truncated_by_time_limit") else ""))
        for key, value in model.items():
            if isinstance(value, dict) and ("error" in value or "skipped" in value):
                add(f"{name} {key}", value.get("error") or value.get("skipped"), "", False if "error" in value else None)
        if "error" in model or "skipped" in model:
            add(name, model.get("error") or model.get("skipped"), "", False if "error" in model else None)
    for key in ("bandwidth", "checks"):
        if "error" in results.get(key, {}):
            add(key, results[key]["error"], "", False)
    return rows


def print_table(results: dict, path: Path) -> None:
    env = results.get("env", {})
    rows = results.get("summary", [])
    print()
    print(f"tokenmill GPU benchmark - {env.get('gpu', env.get('device'))} - {env.get('date_utc')} - "
          f"torch {env.get('torch')}, triton {env.get('triton')}, transformers {env.get('transformers')}")
    widths = [max([len(str(r[k])) for r in rows] + [len(k)]) for k in ("metric", "value", "target")]
    header = ("metric", "value", "target")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  verdict")
    for r in rows:
        print("  ".join(str(r[k])[:100].ljust(w) for k, w in zip(header, widths)) + "  " + r["verdict"])
    print(f"full results: {path} ({results.get('elapsed_s')} s)")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU
    Bench(args).run()


if __name__ == "__main__":
    main()
