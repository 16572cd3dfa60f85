"""Quantized vs full precision on the same prompts: how far the quantized model's predictions drift.

The reference model (full precision) answers each prompt greedily (max_tokens tokens): that text, written by the
model itself, is the evaluation set. Then, for each quantized variant:
- mean per-token KL divergence KL(P_ref || P_quant) of the next-token distributions over the reference
  continuation (teacher-forced: both models read the same tokens), in nats;
- top-1 agreement: the share of those positions where both models' most likely next token is the same;
- greedy agreement: the variant generates greedily on its own; the share of the max_tokens positions where its
  token equals the reference's (after the first difference the texts usually part), and the mean length of the
  common prefix.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypedDict

import torch

# Built-in prompts: varied short requests (facts, code, reasoning, writing), 64 of them.
DEFAULT_PROMPTS = [
    f"{verb} {topic}."
    for verb in ("Explain", "Write two sentences about", "List three facts about", "Give an example of",
                 "Describe", "Summarize what you know about", "What is important about", "Tell a child about")
    for topic in ("the water cycle", "binary search", "the French Revolution", "photosynthesis",
                  "how a CPU cache works", "the capital of Japan", "prime numbers", "writing a Python function")
]


@dataclass
class QualityResult:
    name: str
    mean_kl: float  # nats per token, KL(reference || this)
    top1_agreement: float
    greedy_agreement: float
    mean_common_prefix: float
    num_tokens: int


class ScoredModel:
    """One model to compare: an engine (LLM) for greedy generation and tokenization, and the same model loaded
    on its own (a Worker) for what the serving API does not return: the full next-token distribution at every
    position of a text. kwargs: LLM's engine arguments (dtype, quantization, ...)."""

    def __init__(self, model: str | None, **kwargs: Any) -> None:
        from tokenmill import LLM
        from tokenmill.engine.arg_utils import EngineArgs
        from tokenmill.model.default_model import prepare_model
        from tokenmill.worker.worker import Worker

        self.llm = LLM(model, show_progress=False, **kwargs)
        config = EngineArgs.from_kwargs(model, **kwargs).create_engine_config()
        model_dir = prepare_model(config.model.model, config.model.revision, config.model.download_dir)
        self.worker = Worker(config, model_dir, show_progress=False)


@torch.inference_mode()
def sequence_logprobs(scored: ScoredModel, token_ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's next-token logits at every position of token_ids: [len, vocab] float32."""
    from tokenmill.attention.backend import AttentionMetadata

    worker = scored.worker
    model, spec = worker.model, worker.spec
    block_size = 16
    n = len(token_ids)
    num_blocks = -(-n // block_size)
    caches = [torch.zeros((2, num_blocks, block_size, spec.num_kv_heads, spec.head_dim), dtype=worker.dtype)
              for _ in range(spec.num_layers)]
    meta = AttentionMetadata.build([0, n], [n], torch.arange(num_blocks, dtype=torch.int32)[None],
                                   torch.arange(n, dtype=torch.int64))
    hidden = model(torch.tensor(token_ids), torch.arange(n), caches, meta)
    logits = model.compute_logits(hidden)
    assert logits is not None, "the quality model runs in one process, which holds the whole vocabulary"
    return torch.log_softmax(logits.float(), dim=-1)


def _greedy(llm, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from tokenmill import SamplingParams

    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def encode_prompts(llm, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt as a user message (the model's chat template), or as plain text without one."""
    tokenizer = llm.get_tokenizer()
    ids = []
    for prompt in prompts:
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        except (ValueError, AttributeError):
            text = prompt
        ids.append(tokenizer.encode(text))
    return ids


def compare(reference: ScoredModel, variants: dict[str, ScoredModel], prompts: list[str], max_tokens: int = 128
            ) -> list[QualityResult]:
    """reference: the model at full precision; variants: name -> the same model quantized."""
    prompt_ids = encode_prompts(reference.llm, prompts)
    continuations = _greedy(reference.llm, prompt_ids, max_tokens)
    ref_logprobs = [sequence_logprobs(reference, p + c)[len(p) - 1: len(p) + len(c) - 1]
                    for p, c in zip(prompt_ids, continuations, strict=True)]
    results = []
    for name, scored in variants.items():
        kl_sum, top1, count = 0.0, 0, 0
        for p, c, ref in zip(prompt_ids, continuations, ref_logprobs, strict=True):
            lp = sequence_logprobs(scored, p + c)[len(p) - 1: len(p) + len(c) - 1]
            kl_sum += float((ref.exp() * (ref - lp)).sum())
            top1 += int((ref.argmax(-1) == lp.argmax(-1)).sum())
            count += ref.shape[0]
        own = _greedy(scored.llm, prompt_ids, max_tokens)
        same = sum(sum(1 for a, b in zip(r, o) if a == b) for r, o in zip(continuations, own, strict=True))
        prefixes = []
        for r, o in zip(continuations, own, strict=True):
            k = 0
            while k < min(len(r), len(o)) and r[k] == o[k]:
                k += 1
            prefixes.append(k)
        total = sum(len(r) for r in continuations)
        results.append(QualityResult(name, kl_sum / max(count, 1), top1 / max(count, 1), same / max(total, 1),
                                     sum(prefixes) / max(len(prefixes), 1), count))
    return results


def reference_model_dir(model: str | None) -> Path:
    """A full-precision directory of `model`: for a GGUF (or the bundled model) its weights dequantized to
    bfloat16 (converted once into the cache); a Hugging Face directory as it is."""
    from tokenmill.model.default_model import cache_dir, find_default_gguf, prepare_model

    gguf = find_default_gguf() if model is None else Path(model)
    if gguf.suffix.lower() != ".gguf":
        return prepare_model(model)
    from tokenmill.model.gguf import convert_gguf_to_hf

    stat = gguf.resolve().stat()
    out = cache_dir() / "gguf-dequantized" / f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if not (out / "config.json").is_file():
        staging = out.with_name(out.name + ".tmp")
        convert_gguf_to_hf(gguf, staging, show_progress=False, keep_quantized=False)
        staging.rename(out)
    return out


class _LLMOptions(TypedDict):
    """The engine arguments every compared model is built with."""

    dtype: str
    enable_prefix_caching: bool


def run(model: str | None, quantizations: list[str], prompts: list[str], max_tokens: int, dtype: str = "auto",
        ) -> list[QualityResult]:
    """The model at full precision against itself as stored (a GGUF kept quantized: "gguf") and quantized at
    load with each of `quantizations` (int8, int4)."""
    reference_dir = reference_model_dir(model)
    common = _LLMOptions(dtype=dtype, enable_prefix_caching=False)
    reference = ScoredModel(str(reference_dir), **common)
    variants = {}
    is_gguf = model is None or str(model).lower().endswith(".gguf")
    if is_gguf:
        variants["gguf (as stored)"] = ScoredModel(model, **common)
    for q in quantizations:
        variants[q] = ScoredModel(str(reference_dir), quantization=q, **common)
    return compare(reference, variants, prompts, max_tokens)


def format_results(results: list[QualityResult]) -> str:
    lines = [f"{'variant':<18} {'mean KL (nats)':>14} {'top-1 agree':>12} {'greedy agree':>13} {'common prefix':>14}"]
    for r in results:
        kl = f"{r.mean_kl:.4f}" if math.isfinite(r.mean_kl) else "nan"
        lines.append(f"{r.name:<18} {kl:>14} {r.top1_agreement:>12.3f} {r.greedy_agreement:>13.3f} "
                     f"{r.mean_common_prefix:>14.1f}")
    return "\n".join(lines)


def results_json(results: list[QualityResult]) -> list[dict]:
    return [asdict(r) for r in results]
