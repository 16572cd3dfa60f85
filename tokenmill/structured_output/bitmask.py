"""Token bitmasks: allocate one for a batch, let bitmask processors fill their rows, apply it to the logits.

Layout (the one xgrammar and llguidance both write): int32 [batch, ceil(vocab_size / 32)]; bit j of word i
set means token 32 * i + j may come next. Rows that no processor fills are left alone.

Applying runs on every step for the whole batch, so on CPU it has three tiers, fastest first
(benchmarks/structured_output_backends.py; SmolLM2's 49k vocabulary, 64 rows, float32, 2 threads):

1. a torch.compile'd (inductor) kernel: unpack the bits and masked_fill in one fused, vectorised loop,
   ~0.2-0.5 ms. Compiling takes seconds, so it is used only once warmed up for the (vocab size, dtype) pair,
   in the background (TokenBitmaskBuffer(..., logits_dtype=...)) or by warmup_apply_kernel(); a machine
   without a C++ compiler never gets it;
2. xgrammar's native CPU kernel, ~0.1 ms per row (a scalar loop): the default until the first is ready;
3. plain torch (shift, unpack, masked_fill, with index copies), over 30 ms: other devices and the reference
   the tests compare against.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tokenmill.sample.logits_processor import LogitsProcessor

_SHIFTS = torch.arange(32, dtype=torch.int32)

# Held while torch.compile traces the apply kernel in the background, and by the model runner over each step:
# tracing (torch.fx) patches torch.nn.Module.__call__ for every thread while it runs, so a model running in another
# thread at that moment fails ("NameError: module is not installed as a submodule") and took the engine down. A
# step that starts during the compile waits for it (once per process). Reentrant: a synchronous warm-up inside a
# step is not a deadlock.
TRACING_LOCK = threading.RLock()


def bitmask_words(vocab_size: int) -> int:
    """int32 words per bitmask row: ceil(vocab_size / 32)."""
    return (vocab_size + 31) // 32


def allocate_token_bitmask(batch_size: int, vocab_size: int) -> torch.Tensor:
    """A [batch_size, ceil(vocab_size / 32)] int32 CPU bitmask with every token allowed."""
    return torch.full((batch_size, bitmask_words(vocab_size)), -1, dtype=torch.int32)


def unpack_token_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The bool [batch, vocab_size] allowed-token matrix of a bitmask (tests and debugging)."""
    bits = (bitmask.unsqueeze(-1) >> _SHIFTS.to(bitmask.device)) & 1  # [batch, words, 32]
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def apply_token_bitmask_(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int] | None = None
) -> None:
    """Set logits[row, token] = -inf for every token whose bit is clear in bitmask[row], in place.

    logits: [batch, vocab_size] float32/bfloat16/float16 on any device; bitmask: int32 [batch, words] on CPU,
    words = ceil(vocab_size / 32) (a narrower bitmask forbids the logits it does not cover). rows: the rows to
    mask (rows not listed are untouched); None means all.
    """
    if logits.dim() != 2 or bitmask.dim() != 2 or bitmask.dtype != torch.int32:
        raise ValueError(
            f"apply_token_bitmask_ needs [batch, vocab] logits and an int32 [batch, words] bitmask, got "
            f"logits {tuple(logits.shape)} and bitmask {tuple(bitmask.shape)} {bitmask.dtype}"
        )
    row_list = list(range(logits.shape[0])) if rows is None else list(rows)
    if not row_list:
        return
    if bitmask.shape[0] < logits.shape[0] and max(row_list) >= bitmask.shape[0]:
        raise ValueError(f"bitmask has {bitmask.shape[0]} rows, row {max(row_list)} was asked for")
    vocab_size = logits.shape[1]
    covered = min(vocab_size, bitmask.shape[1] * 32)
    if covered < vocab_size:
        # Token ids past the bitmask have no grammar meaning (padding of the lm_head): never allowed.
        logits[row_list, covered:] = float("-inf")
    if logits.device.type == "cpu" and covered == vocab_size and _COMPILED.ready(vocab_size, logits.dtype):
        batch_mask = bitmask[: logits.shape[0]]
        if len(row_list) != logits.shape[0]:
            # Rows not asked for get an all-allowed row: the fused kernel then leaves their values as they are.
            batch_mask = batch_mask.clone()
            keep = torch.ones(logits.shape[0], dtype=torch.bool)
            keep[row_list] = False
            batch_mask[keep] = -1
        if _COMPILED(logits, batch_mask):
            return
    kernel = _xgrammar_cpu_kernel() if logits.device.type == "cpu" else None
    if kernel is not None and logits.dtype in _XGRAMMAR_CPU_DTYPES:
        kernel(logits, bitmask, covered, row_list)
        return
    apply_token_bitmask_torch_(logits, bitmask.to(logits.device, non_blocking=True), row_list, covered)


def apply_token_bitmask_torch_(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int], vocab_size: int | None = None
) -> None:
    """The plain torch version of apply_token_bitmask_ (unpack with shifts, masked_fill): the reference."""
    vocab_size = logits.shape[1] if vocab_size is None else vocab_size
    index = torch.as_tensor(list(rows), dtype=torch.long, device=logits.device)
    allowed = unpack_token_bitmask(bitmask.index_select(0, index.to(bitmask.device)), vocab_size)
    masked = logits.index_select(0, index)[:, :vocab_size].masked_fill(~allowed, float("-inf"))
    logits[index, :vocab_size] = masked


def fill_token_bitmask(
    bitmask: torch.Tensor, processors: Sequence[LogitsProcessor | None]
) -> list[int]:
    """Let each bitmask processor fill its row (processors[row]; None or a non-bitmask processor: skipped).

    Returns the rows filled: the rows to pass to apply_token_bitmask_.
    """
    rows = []
    for row, processor in enumerate(processors):
        if processor is not None and processor.uses_bitmask:
            processor.fill_bitmask(bitmask, row)
            rows.append(row)
    return rows


class TokenBitmaskBuffer:
    """A bitmask for up to max_num_seqs rows, allocated once and reused by every step.

    The sampler's whole use per step:

        rows = buffer.fill(processors)           # processors[row]: the row's matcher or None
        buffer.apply(logits, rows)               # logits: [batch, vocab_size]
    """

    def __init__(self, max_num_seqs: int, vocab_size: int, logits_dtype: torch.dtype | None = None):
        self.vocab_size = vocab_size
        self.bitmask = allocate_token_bitmask(max_num_seqs, vocab_size)  # [max_num_seqs, words]
        if logits_dtype is not None:
            # Compile the fused CPU kernel for this vocabulary and dtype off the step; until it is ready,
            # apply() uses xgrammar's kernel.
            warmup_apply_kernel(vocab_size, logits_dtype, background=True)

    def fill(self, processors: Sequence[LogitsProcessor | None]) -> list[int]:
        if len(processors) > self.bitmask.shape[0]:
            self.bitmask = allocate_token_bitmask(len(processors), self.vocab_size)
        return fill_token_bitmask(self.bitmask, processors)

    def apply(self, logits: torch.Tensor, rows: Sequence[int]) -> None:
        if rows:
            apply_token_bitmask_(logits, self.bitmask[: logits.shape[0]], rows)


_XGRAMMAR_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _xgrammar_cpu_kernel() -> Callable[..., None] | None:
    """xgrammar's native CPU apply kernel, or None when xgrammar is not installed (looked up once)."""
    try:
        from xgrammar.kernels.apply_token_bitmask_inplace_cpu import apply_token_bitmask_inplace_cpu
    except ImportError:
        return None
    return apply_token_bitmask_inplace_cpu


def _apply_bitmask_fused(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """The body of the compiled kernel: every row of logits masked by the same row of bitmask."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [batch, words, 32]
    allowed = bits.reshape(bitmask.shape[0], -1)[:, : logits.shape[1]] != 0  # [batch, vocab]
    logits.masked_fill_(~allowed, float("-inf"))


class _CompiledApply:
    """The torch.compile'd apply kernel, and which (vocab size, dtype) pairs it has been warmed up for.

    Batch 1 and batch 2 are compiled at warm-up (torch specialises size 1); every larger batch reuses the
    dynamic-shape graph of batch 2. A compile failure (no C++ compiler) disables it for the process.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fn: Callable[[torch.Tensor, torch.Tensor], None] | None = None
        self._ready: set[tuple[int, torch.dtype]] = set()
        self.failed: str | None = None

    def ready(self, vocab_size: int, dtype: torch.dtype) -> bool:
        return self.failed is None and (vocab_size, dtype) in self._ready

    def warmup(self, vocab_size: int, dtype: torch.dtype) -> bool:
        with self._lock, TRACING_LOCK:
            if self.failed is not None:
                return False
            if (vocab_size, dtype) in self._ready:
                return True
            try:
                if self._fn is None:
                    self._fn = torch.compile(_apply_bitmask_fused, dynamic=True)
                for batch in (1, 2):
                    logits = torch.zeros(batch, vocab_size, dtype=dtype)
                    bitmask = allocate_token_bitmask(batch, vocab_size)
                    bitmask[:, 0] = 0
                    self._fn(logits, bitmask)
                    if not torch.isneginf(logits[:, :32]).all() or logits[:, 32:].any():
                        raise RuntimeError("the compiled kernel gave wrong results")
            except Exception as e:  # no C++ toolchain, an inductor limitation: keep the other kernels
                self.failed = f"{type(e).__name__}: {e}"
                return False
            self._ready.add((vocab_size, dtype))
            return True

    def __call__(self, logits: torch.Tensor, bitmask: torch.Tensor) -> bool:
        assert self._fn is not None
        try:
            self._fn(logits, bitmask)
        except Exception as e:
            self.failed = f"{type(e).__name__}: {e}"
            return False
        return True


_COMPILED = _CompiledApply()


def warmup_apply_kernel(vocab_size: int, dtype: torch.dtype, background: bool = False) -> bool:
    """Compile the fused CPU apply kernel for [*, vocab_size] logits of dtype (seconds, once per process).

    Returns whether it is ready (always False with background=True: it becomes ready later). Until it is,
    apply_token_bitmask_ uses xgrammar's kernel.
    """
    if not background:
        return _COMPILED.warmup(vocab_size, dtype)
    threading.Thread(
        target=_COMPILED.warmup, args=(vocab_size, dtype), name="tokenmill-bitmask-compile", daemon=True
    ).start()
    return False
