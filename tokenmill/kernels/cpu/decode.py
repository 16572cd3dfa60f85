"""The fused decode step on the CPU: every decoder layer of a decode-only step in one native call.

A batch-1 decode step of a small model is short (the bundled 135M model: ~30 ms op by op), and op by op it
spent about two thirds of it outside the kernels' arithmetic (BENCHMARKS.md, issue 15): ~10 Python calls a layer
(norms, projections, rotary, cache write, attention, activation), each with its argument checks, tensor
allocations and ctypes crossing, and attention waking a second thread for a few microseconds of work. tokenmill_decode_forward (csrc/decode_layer.c) runs the
same kernels with the same arguments from C, over scratch rows allocated once, so the step's Python work is the
embedding lookup, this call and sampling: where a packed kernel holds the output layer too (a GGUF model's tied
Q8_0 embedding), the call computes the logits as well, in the same parallel region (the op-by-op path's kernel
and sums), for as many rows as that kernel takes packed; LlamaForCausalLM.compute_logits takes them with
take_logits.

When it runs (FusedDecoder.build says why not in the log, at debug level):
- CPU, activations and KV cache in bfloat16 with the native layer ops built and vectorized (AVX512-BF16), or in
  float32 with the native library built (any x86-64; the packed kernels' AVX2 paths on x86-64-v3, which is where
  --dtype auto picks float32: CPUs without native bf16);
- every projection held by a packed int4 or int8 kernel (quant.py's Int4Weight / Int8Weight: GGUF Q4_0, Q4_1,
  Q4_K, Q8_0, Q6_K, AWQ, GPTQ without act-order, --quantization int8 / int4), biases allowed; no per-head q/k
  norm (Qwen3); one device holding every layer (tensor_parallel_size 1: the sharded layers' all-reduces are not in
  the C code; no pipeline stages); not in batch-invariant mode;
- per step: every scheduled sequence decodes one token, and there are at most as many rows as the packed kernels
  take (8 for the decoder's projections); any other step runs op by op.

TOKENMILL_FUSED_DECODE=0 turns it off (the op-by-op path then runs every step), to compare the two.

The step runs in one parallel region (one fork and join a step): the threads split every projection's output
columns and meet at barriers between dependent stages; ThreadChooser picks one thread or the engine's count by
measuring, since on a CPU shared with other busy processes the barriers can cost more than a thread saves.

Results are those of the op-by-op path at any number of threads: in bfloat16 bit for bit while attention splits
no sequence differently (sequences of up to 256 positions, or attention work of MIN_PARALLEL_ATTENTION and more,
where both use the engine's thread count); in between, the split attention's partial sums merge in another order
(bfloat16 rounding differences). In float32 the projections and attention are the op-by-op path's kernels and
the norms, rotary and activation PyTorch's float32 arithmetic in C, equal up to float32 summation order.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import statistics
import time
from typing import Any

import torch

from tokenmill.kernels.cpu import ops
from tokenmill.kernels.cpu.quant import Int4Weight, Int8Weight

logger = logging.getLogger("tokenmill")

ENV_FLAG = "TOKENMILL_FUSED_DECODE"
# Attention work (positions attended x query heads x head_dim) below which a decode step's attention runs on one
# thread: waking a second thread costs more than it saves. The bundled model's attention over its 30 layers at
# 400 / 1000 / 2000 positions (2 M is ~3600) took 0.56 / 1.17 / 7.6 ms on one thread and 1.2 / 4.9 / 21 ms on two
# on a shared 2-core VM (benchmarks/decode_step.py --context N; BENCHMARKS.md, issue 15).
MIN_PARALLEL_ATTENTION = 1 << 21

# Multiply-adds of a step's projections (rows x the decoder's weight elements) below which the step runs on one
# thread: the step's one fork and join, and its ~5 barriers a layer, cost more than a second thread saves. The
# bundled model's step is ~100 M (one row); the tests' tiny models are far below (tests lower it to run both).
MIN_PARALLEL_STEP = 1 << 22

_WEIGHT_INT8, _WEIGHT_INT4 = 0, 1


class _Weight(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("q", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("offsets", ctypes.c_void_p), ("group", ctypes.c_int64), ("n", ctypes.c_int64),
                ("k", ctypes.c_int64), ("bias", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("qkv", _Weight), ("o", _Weight),
                ("gate_up", _Weight), ("down", _Weight), ("sliding_window", ctypes.c_int32)]


class _Model(ctypes.Structure):
    _fields_ = [("num_layers", ctypes.c_int32), ("hidden", ctypes.c_int32), ("num_heads", ctypes.c_int32),
                ("num_kv_heads", ctypes.c_int32), ("head_dim", ctypes.c_int32), ("intermediate", ctypes.c_int32),
                ("max_rows", ctypes.c_int32), ("eps", ctypes.c_float), ("scale", ctypes.c_float),
                ("layers", ctypes.POINTER(_Layer)), ("final_norm", ctypes.c_void_p), ("cos", ctypes.c_void_p),
                ("sin", ctypes.c_void_p), ("min_parallel_attention", ctypes.c_int64),
                ("min_parallel_step", ctypes.c_int64), ("x", ctypes.c_void_p), ("qkv", ctypes.c_void_p),
                ("q", ctypes.c_void_p), ("attn", ctypes.c_void_p), ("gate_up", ctypes.c_void_p),
                ("dtype", ctypes.c_int32), ("lm_head", _Weight)]

# decode_layer.c's codes for the activations' dtype (paged_decode_attention's).
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


def enabled_by_env() -> bool:
    """False when TOKENMILL_FUSED_DECODE is 0 / false / off (the op-by-op path runs every step)."""
    return os.environ.get(ENV_FLAG, "1").strip().lower() not in ("0", "false", "off", "no")


def output_kernel(model: Any) -> Int4Weight | Int8Weight | None:
    """The packed kernel of model's output layer (its own, or the tied embedding table's), or None."""
    from tokenmill.model.layers.linear import TiedLMHead

    head = model.lm_head
    layer = head.embedding if isinstance(head, TiedLMHead) else head
    if getattr(layer, "quant_method", None) is None or getattr(layer, "bias", None) is not None:
        return None
    return packed_kernel(layer)


def packed_kernel(linear: Any) -> Int4Weight | Int8Weight | None:
    """The packed kernel that computes linear(x) as kernel.matmul(x) (+ bias) for a few rows, or None when the
    layer's method does anything else (full precision, fp8, act-order, Triton, several kernels per layer)."""
    from tokenmill.model.quantization.gguf import GGUFLinearMethod
    from tokenmill.model.quantization.rtn import _QuantizeAtLoadMethod
    from tokenmill.model.quantization.weight_only import WeightOnlyIntMethod

    method = linear.quant_method
    kernel: Any = None
    if type(method).apply is GGUFLinearMethod.apply:
        kernels = getattr(linear, "qweights", [])
        kernel = kernels[0] if len(kernels) == 1 else None
    elif type(method).apply is _QuantizeAtLoadMethod.apply:
        kernel = getattr(linear, "qweight", None)
    elif type(method).apply is WeightOnlyIntMethod.apply:
        if getattr(linear, "quant_backend", None) == "cpu" and getattr(linear, "input_perm", None) is None:
            kernel = getattr(linear, "qweight", None)
    if not isinstance(kernel, (Int4Weight, Int8Weight)):
        return None
    if (kernel.out_features, kernel.in_features) != (linear.out_features, linear.in_features):
        return None
    return kernel


class ThreadChooser:
    """How many threads the fused step runs on, chosen by measuring it: one, or the engine's thread count.

    The step splits every projection over its threads, which meet at ~5 barriers a layer. On a dedicated CPU the
    threads add bandwidth; on a CPU shared with other busy processes a thread is often descheduled, and then the
    other waits for it at each barrier: measured on a loaded 2-core VM, two threads ran a step in 0.93x to 2.4x the
    time of one (BENCHMARKS.md, issue 15). So each thread count keeps the median of its last 5 step times (per
    number of rows), the faster one runs, and the other is tried again every `explore_every` steps to
    follow the machine's load. The results do not depend on the choice (csrc/decode_layer.c).
    """

    def __init__(self, explore_every: int = 32, window: int = 5) -> None:
        self.explore_every = explore_every
        # (rows, threads) -> the last `window` step times: their median is robust to a step that met a burst of
        # load, or the first step of a thread count (starting its threads).
        self._seconds: dict[tuple[int, int], collections.deque[float]] = {}
        self._window = window
        self._steps = 0

    def _median(self, rows: int, threads: int) -> float | None:
        times = self._seconds.get((rows, threads))
        return statistics.median(times) if times else None

    def pick(self, rows: int, max_threads: int) -> int:
        if max_threads <= 1:
            return 1
        self._steps += 1
        known = {n: self._median(rows, n) for n in (1, max_threads)}
        untried = [n for n, s in known.items() if s is None]
        if untried:
            return untried[0]
        best = min(known, key=lambda n: known[n] or 0.0)
        if self._steps % self.explore_every == 0:
            return max_threads if best == 1 else 1
        return best

    def record(self, rows: int, threads: int, seconds: float) -> None:
        self._seconds.setdefault((rows, threads), collections.deque(maxlen=self._window)).append(seconds)


class FusedDecoder:
    """The decoder stack of a built LlamaForCausalLM (weights loaded and packed) as one native call per decode
    step. build() returns None, with the reason at debug level, where the fused path does not apply."""

    def __init__(self, model: Any, kernels: list[list[Int4Weight | Int8Weight]], scale: float,
                 windows: list[int]) -> None:
        spec = model.spec
        self._lib = ops._library()
        self._embed = model.embed_tokens
        self.hidden = spec.hidden_size
        self.dtype = model.norm.weight.dtype
        self.max_rows = min(k.max_packed_rows for layer in kernels for k in layer)
        self._keep: list[torch.Tensor] = []  # everything the C structs point at stays alive with this object
        layers = (_Layer * spec.num_layers)()
        for i, (layer, (qkv, o, gate_up, down)) in enumerate(zip(model.layers, kernels, strict=True)):
            attn, mlp = layer.self_attn, layer.mlp
            layers[i].input_norm = self._ptr(layer.input_layernorm.weight)
            layers[i].post_norm = self._ptr(layer.post_attention_layernorm.weight)
            layers[i].qkv = self._weight(qkv, attn.qkv_proj.bias)
            layers[i].o = self._weight(o, attn.o_proj.bias)
            layers[i].gate_up = self._weight(gate_up, mlp.gate_up_proj.bias)
            layers[i].down = self._weight(down, mlp.down_proj.bias)
            layers[i].sliding_window = windows[i]
        self._layers = layers
        q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        rows = self.max_rows

        def scratch(width: int) -> int:
            t = torch.empty((rows, width), dtype=self.dtype)
            self._keep.append(t)
            return t.data_ptr()

        # The output layer in the step's region, for up to head_rows rows (its kernel's packed rows: more run op by
        # op, through the tile kernel); 0 where no packed kernel holds it.
        head = output_kernel(model)
        self.head_rows = min(head.max_packed_rows, rows) if head is not None else 0
        self._vocab = head.out_features if head is not None else 0
        self._logits: tuple[torch.Tensor, torch.Tensor] | None = None
        self._model = _Model(
            num_layers=spec.num_layers, hidden=spec.hidden_size, num_heads=spec.num_heads,
            num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, intermediate=spec.intermediate_size,
            max_rows=rows, eps=spec.rms_norm_eps, scale=scale, layers=layers, final_norm=self._ptr(model.norm.weight),
            cos=self._ptr(model.rotary.cos.float()), sin=self._ptr(model.rotary.sin.float()),
            min_parallel_attention=MIN_PARALLEL_ATTENTION, min_parallel_step=MIN_PARALLEL_STEP,
            x=scratch(spec.hidden_size), qkv=scratch(q_size + 2 * kv_size), q=scratch(q_size), attn=scratch(q_size),
            gate_up=scratch(2 * spec.intermediate_size), dtype=_DTYPE_CODES[self.dtype],
            lm_head=self._weight(head, None) if head is not None else _Weight(),
        )
        # Threads of each step: None lets the chooser measure; a number fixes it (benchmarks, tests).
        self.step_threads: int | None = None
        self.chooser = ThreadChooser()
        self._kv_key: tuple[int, ...] | None = None
        self._kv_ptrs: Any = None

    def _ptr(self, t: torch.Tensor) -> int:
        t = t.detach().contiguous()
        self._keep.append(t)
        return t.data_ptr()

    def _weight(self, kernel: Int4Weight | Int8Weight, bias: torch.Tensor | None) -> _Weight:
        w = _Weight(n=kernel.out_features, k=kernel.in_features, group=kernel.group,
                    bias=self._ptr(bias.to(self.dtype)) if bias is not None else None)
        if isinstance(kernel, Int4Weight):
            w.kind, w.q, w.scales, w.offsets = (_WEIGHT_INT4, self._ptr(kernel.packed), self._ptr(kernel.scales),
                                                self._ptr(kernel.offsets))
        else:
            w.kind, w.q, w.scales = _WEIGHT_INT8, self._ptr(kernel.q), self._ptr(kernel.scales)
        return w

    @classmethod
    def build(cls, model: Any, tensor_parallel_size: int = 1) -> FusedDecoder | None:
        """The fused decoder of `model`, or None where it does not apply (see the module docstring)."""
        reason = cls._unsupported(model, tensor_parallel_size)
        if isinstance(reason, str):
            logger.debug("fused decode step off: %s", reason)
            return None
        kernels, scale, windows = reason
        return cls(model, kernels, scale, windows)

    @staticmethod
    def _unsupported(model: Any, tensor_parallel_size: int) -> str | tuple[list[list[Any]], float, list[int]]:
        """Why the fused path cannot run this model, or what it needs: (kernels per layer, scale, windows)."""
        from tokenmill.attention.cpu_backend import CPUAttentionBackend

        if not enabled_by_env():
            return f"{ENV_FLAG}=0"
        if tensor_parallel_size != 1:
            return f"tensor_parallel_size={tensor_parallel_size}"
        spec = model.spec
        if getattr(model, "num_stage_layers", spec.num_layers) != spec.num_layers:
            return "a pipeline stage holds only its own layers"
        dtype, device = model.norm.weight.dtype, model.norm.weight.device
        if device.type != "cpu" or dtype not in _DTYPE_CODES:
            return f"activations are {dtype} on {device}, not bfloat16 or float32 on CPU"
        if dtype == torch.bfloat16 and not ops.layer_ops_supported():
            return "the native bfloat16 layer ops are not built or not vectorized on this CPU"
        if ops.load_library() is None:
            return "the native CPU kernels are not built"
        if spec.qk_norm:
            return "per-head q/k norms"
        if spec.head_dim % 2:
            return f"odd head_dim {spec.head_dim}"
        kernels: list[list[Any]] = []
        scales, windows = set(), []
        for i, layer in enumerate(model.layers):
            attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            if attn is None or mlp is None:
                return f"layer {i} is not held here (a pipeline stage holds only its own layers)"
            backend = attn.backend
            if not isinstance(backend, CPUAttentionBackend):
                return f"layer {i}: attention backend {backend.name}, not the CPU backend's paged decode kernel"
            if backend.batch_invariant:
                return "batch-invariant mode (its attention never splits a sequence across threads)"
            scales.add(backend.scale)
            windows.append(int(backend.sliding_window or 0))
            found = [packed_kernel(p) for p in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            if any(k is None for k in found):
                return f"layer {i}: a projection is not held by a packed int4/int8 kernel"
            kernels.append(found)
        if len(scales) != 1:
            return "layers with different attention scales"
        return kernels, scales.pop(), windows

    def _kv_pointers(self, kv_caches: list[torch.Tensor]) -> Any:
        key = (id(kv_caches), len(kv_caches), kv_caches[0].data_ptr(), kv_caches[-1].data_ptr())
        if key != self._kv_key:
            self._kv_ptrs = (ctypes.c_void_p * len(kv_caches))(*(t.data_ptr() for t in kv_caches))
            self._kv_key = key
        return self._kv_ptrs

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: Any) -> torch.Tensor | None:
        """Final hidden states [rows, hidden] of a decode-only step of at most max_rows sequences, or None for
        any other step (the caller then runs the layers op by op)."""
        rows = meta.num_tokens
        if rows != meta.num_seqs or rows > self.max_rows or input_ids.device.type != "cpu":
            return None
        kv = kv_caches[0]
        if kv.dtype != self.dtype or not kv.is_contiguous():
            return None
        x = self._embed(input_ids)
        if x.dtype != self.dtype:
            return None
        x = x.contiguous()
        positions = positions if positions.dtype == torch.int64 else positions.to(torch.int64)
        slots = meta.slot_mapping if meta.slot_mapping.dtype == torch.int64 else meta.slot_mapping.to(torch.int64)
        tables = meta.block_tables
        if tables.dtype != torch.int32 or not tables.is_contiguous():
            tables = tables.to(torch.int32).contiguous()
        seq_lens = meta.seq_lens if meta.seq_lens.dtype == torch.int32 else meta.seq_lens.to(torch.int32)
        out = torch.empty((rows, self.hidden), dtype=self.dtype)
        logits = torch.empty((rows, self._vocab), dtype=self.dtype) if rows <= self.head_rows else None
        num_threads = torch.get_num_threads()
        threads = self.step_threads or self.chooser.pick(rows, num_threads)
        start = time.perf_counter()
        status = self._lib.tokenmill_decode_forward(
            ctypes.byref(self._model), x.data_ptr(), out.data_ptr(), rows, positions.contiguous().data_ptr(),
            slots.contiguous().data_ptr(), self._kv_pointers(kv_caches), kv.shape[1], kv.shape[2],
            tables.data_ptr(), tables.shape[1], seq_lens.contiguous().data_ptr(), num_threads, threads,
            logits.data_ptr() if logits is not None else None)
        if self.step_threads is None:
            self.chooser.record(rows, threads, time.perf_counter() - start)
        if status == -1:
            raise MemoryError("the fused decode step could not allocate its packed-kernel buffers")
        if status != 0:
            raise RuntimeError(f"the fused decode step failed with status {status}")
        self._logits = (out, logits) if logits is not None else None
        return out

    def take_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The logits the last step computed with its hidden states, if hidden is that step's output (every row
        samples, so the caller passes it whole); None otherwise (the caller computes them). Taken once."""
        pending, self._logits = self._logits, None
        if pending is None or pending[0] is not hidden:
            return None
        return pending[1]
