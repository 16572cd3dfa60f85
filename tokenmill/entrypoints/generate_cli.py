"""`tokenmill generate` and `tokenmill chat`: offline generation from the command line."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenmill.sampling_params import SamplingParams


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Engine flags shared by every command that builds an engine (names as `vllm serve`)."""
    parser.add_argument("model", nargs="?", default=None,
                        help="Hugging Face model directory, .gguf file or hub id such as Qwen/Qwen2.5-0.5B-Instruct "
                             "(default: bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--revision", default=None,
                        help="hub ids: the branch, tag or commit to load (default: main)")
    parser.add_argument("--download-dir", default=None,
                        help="hub ids: the Hugging Face cache directory to download into and load from (default: "
                             "$HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub); HF_HUB_OFFLINE=1 only reads it")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                        help="weights and activations dtype; auto = bf16 where the hardware runs it fast")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="longest prompt + output in tokens (default: the model's limit, capped by the KV cache)")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="most requests in one batch")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="most tokens computed per engine step (default 2048 on CPU, 8192 on CUDA)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    parser.add_argument("--kv-cache-memory", default=None,
                        help="KV cache size in bytes or with a unit, e.g. 2GiB (CPU default: 4 GiB or 1/4 of RAM)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="fraction of GPU memory the engine may use (CUDA)")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse KV blocks of shared prompt prefixes")
    parser.add_argument("--seed", type=int, default=0, help="seed for requests without their own")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the model runs")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                        help="number of GPUs to shard the model over (only 1 is supported yet)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="CUDA: always run eagerly, never replay captured CUDA graphs for decode steps")
    parser.add_argument("--async-scheduling", action="store_true",
                        help="launch each step before the previous one's tokens reach the host, hiding the "
                             "scheduling and output work behind the GPU's (one wasted token per stop)")
    parser.add_argument("--pooling-type", default="LAST", type=str.upper, choices=["LAST", "MEAN"],
                        help="how /v1/embeddings pools the prompt's final hidden states: the last token's, or "
                             "their mean (vectors are L2-normalized)")
    parser.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=None,
                        help="kernels whose results do not depend on the batch: greedy and seeded outputs are "
                             "identical whatever else runs, at a cost in throughput (CPU only; default: the "
                             "TOKENMILL_BATCH_INVARIANT environment variable, else off)")
    parser.add_argument("--quantization", "-q", default=None, type=str.lower,
                        help="weight format: default the checkpoint's own (GGUF files run kept quantized); int8 / "
                             "int4 quantize a full-precision checkpoint at load (weight-only, round to nearest)")
    parser.add_argument("--structured-outputs-backend", default="auto", choices=["auto", "xgrammar", "guidance"],
                        help="grammar library for structured outputs (JSON schema, regex, choice, grammar): auto "
                             "uses xgrammar, and llguidance where xgrammar cannot enforce the specification")
    parser.add_argument("--structured-outputs-compile-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="seconds a request's grammar may take to compile; past it that request fails alone")
    parser.add_argument("--chat-template", default=None,
                        help="Jinja chat template (a file path or the template text) overriding the model's")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """LLM(...) keyword arguments from the parsed engine flags."""
    chat_template = args.chat_template
    if chat_template is not None:
        from pathlib import Path

        path = Path(chat_template)
        if path.is_file():
            chat_template = path.read_text()
    return dict(
        dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory, gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching, seed=args.seed, device=args.device,
        tensor_parallel_size=args.tensor_parallel_size, chat_template=chat_template,
        enforce_eager=args.enforce_eager, async_scheduling=args.async_scheduling,
        pooling_type=args.pooling_type,
        revision=args.revision, download_dir=args.download_dir,
        batch_invariant=args.batch_invariant, quantization=args.quantization,
        structured_outputs_backend=args.structured_outputs_backend,
        structured_outputs_compile_timeout=args.structured_outputs_compile_timeout,
    )


# Defaults of `generate` and `chat`: sampled text, a little nudged away from repeats. Greedy decoding of small
# models loops on the same phrase within a hundred tokens; --temperature 0 asks for it.
SAMPLING_DEFAULTS = {"max_tokens": 128, "temperature": 0.7, "top_p": 0.9, "top_k": 0, "repetition_penalty": 1.1}


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    d = SAMPLING_DEFAULTS
    parser.add_argument("--max-tokens", type=int, default=d["max_tokens"],
                        help=f"most tokens to generate per prompt (default {d['max_tokens']})")
    parser.add_argument("--temperature", type=float, default=d["temperature"],
                        help=f"sampling temperature; 0 = greedy (default {d['temperature']})")
    parser.add_argument("--top-p", type=float, default=d["top_p"],
                        help=f"nucleus sampling: keep the most likely tokens up to this mass (default {d['top_p']})")
    parser.add_argument("--top-k", type=int, default=d["top_k"],
                        help="keep only the k most likely tokens; 0 = all (default 0)")
    parser.add_argument("--repetition-penalty", type=float, default=d["repetition_penalty"],
                        help="shrink the logits of tokens already in the prompt or output; 1 = off "
                             f"(default {d['repetition_penalty']})")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The SamplingParams of `generate` / `chat` from their parsed flags."""
    from tokenmill import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, repetition_penalty=args.repetition_penalty)


def _run_generate(args: argparse.Namespace) -> int:
    from tokenmill import LLM

    params = sampling_params(args)
    llm = LLM(args.model, **engine_kwargs(args))
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if args.command == "chat":
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    else:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outputs, strict=True):
        print(f">>> {prompt}\n{out.outputs[0].text}\n")
    return 0


def register(subparsers) -> None:
    for name, help_text in (("generate", "complete prompts with a model (offline)"),
                            ("chat", "answer user messages with the model's chat template (offline)")):
        parser = subparsers.add_parser(name, help=help_text, description=help_text)
        add_engine_args(parser)
        _sampling_args(parser)
        parser.add_argument("--prompt", "-p", action="append",
                            help="a prompt (repeatable); without it, one prompt per line of standard input")
        parser.set_defaults(func=_run_generate)
