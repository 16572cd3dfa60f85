"""The fused decode step (tokenmill/kernels/cpu/decode.py, csrc/decode_layer.c) gives the op-by-op path's tokens
and logits, and runs exactly where it applies."""

from __future__ import annotations

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.kernels.cpu import ops, quant
from tokenmill.kernels.cpu.decode import ENV_FLAG, FusedDecoder
from tokenmill.kernels.cpu.quant import pack_int4

pytestmark = pytest.mark.skipif(ops.load_library() is None, reason="the fused decode step needs a C compiler")
needs_bf16 = pytest.mark.skipif(not ops.layer_ops_supported(),
                                reason="the fused decode step in bfloat16 needs AVX512-BF16")
# The activations' dtypes the fused step runs in: float32 on any CPU, bfloat16 where its ops are vectorized.
DTYPES = [pytest.param("bfloat16", marks=needs_bf16), "float32"]
# The dtype of the tests that are about something else: the one --dtype auto picks on CPUs like this one.
DTYPE = "bfloat16" if ops.layer_ops_supported() else "float32"


@needs_bf16
@pytest.mark.parametrize("rows", [1, 3, 4, 8])
@pytest.mark.parametrize(("n", "k", "group"), [(96, 576, 32), (40, 96, 32), (64, 256, 64), (48, 384, 128)])
def test_int4_gemv_equals_the_exact_product(n, k, group, rows):
    """The fused step's bf16 dot-product GEMV against float64 on the dequantized weight: equal up to the output's
    bfloat16 rounding and float32 sums, for group sizes 32-128 and an odd number of 32-input chunks (k = 96)."""
    g = torch.Generator().manual_seed(n + k + rows)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scales = torch.rand(n, k // group, generator=g) * 0.02
    bias = -torch.rand(n, k // group, generator=g) * 0.1
    weight = pack_int4(q, scales, None, group, bias=bias)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    out = torch.empty(rows, n, dtype=torch.bfloat16)
    status = ops._library().int4_gemv_bf16(
        x.data_ptr(), k, weight.packed.data_ptr(), weight.scales.data_ptr(), weight.offsets.data_ptr(), group,
        out.data_ptr(), n, rows, n, k, 1)
    assert status == 0
    exact = x.double() @ weight.dequantize(torch.float32).double().T
    magnitude = (x.double().abs() @ weight.dequantize(torch.float32).double().abs().T).max()
    assert (out.double() - exact).abs().max() <= 2 ** -8 * exact.abs().max() + 1e-5 * magnitude
    # The op-by-op path runs it for the rows the fused step takes (Int4Weight.matmul up to max_packed_rows), so both
    # paths compute the same sums; above, the tile kernel's sums differ only by rounding.
    if rows <= weight.max_packed_rows:
        assert torch.equal(weight.matmul(x), out)


@needs_bf16
def test_int4_gemv_wide_ranges_and_non_finite_inputs():
    """The GEMV lays each chunk of 32 inputs out as 16-bit integers under a power-of-two scale: a chunk whose
    inputs span 2^-24 to 2^10 (one large input, the rest far below it), and chunks of tiny inputs alone (2^-120:
    their own scale, not flushed by a larger chunk), stay within the bound of the exact product; a NaN or an
    infinite input makes every output of its row non-finite, as the float product would."""
    n, k, group = 64, 256, 32
    g = torch.Generator().manual_seed(7)
    weight = pack_int4(torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g), torch.rand(n, k // group,
                       generator=g) * 0.02, None, group, bias=-torch.rand(n, k // group, generator=g) * 0.1)
    x = torch.randn(4, k, generator=g) * 2.0 ** torch.randint(-24, 0, (4, k), generator=g)
    x[0, ::32] = 1024.0
    x[1] = torch.randn(k, generator=g) * 2.0 ** -120
    x[2, 5], x[3, 200] = float("nan"), float("inf")
    x = x.to(torch.bfloat16)
    out = torch.empty(4, n, dtype=torch.bfloat16)
    assert ops._library().int4_gemv_bf16(
        x.data_ptr(), k, weight.packed.data_ptr(), weight.scales.data_ptr(), weight.offsets.data_ptr(), group,
        out.data_ptr(), n, 4, n, k, 1) == 0
    w = weight.dequantize(torch.float32).double()
    for row in (0, 1):
        exact = x[row].double() @ w.T
        magnitude = (x[row].double().abs() @ w.abs().T).max()
        assert (out[row].double() - exact).abs().max() <= 2 ** -8 * exact.abs().max() + 1e-5 * magnitude
        assert exact.abs().max() > 0
    assert not out[2:].float().isfinite().any()


PROMPTS = ["The quick brown fox", "Paged attention stores keys and values", "1234567890 + 987654321 = ?"]


def tiny_llm(path, **kwargs) -> LLM:
    """A tiny model's engine with a small KV cache (fast to set up)."""
    kwargs = {"dtype": DTYPE, "show_progress": False, "max_model_len": 256, "kv_cache_memory": "8MiB"} | kwargs
    return LLM(str(path), **kwargs)


def _generate(llm: LLM, prompts: list[str], max_tokens: int) -> list[tuple[list[int], list[float]]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=0)
    outs = llm.generate(prompts, params, use_tqdm=False)
    result = []
    for out in outs:
        completion = out.outputs[0]
        assert completion.logprobs is not None
        logprobs = [position[token].logprob for token, position in zip(completion.token_ids, completion.logprobs,
                                                                         strict=True)]
        result.append((list(completion.token_ids), logprobs))
    return result


def _fused_vs_op_by_op(llm: LLM, prompts: list[str], max_tokens: int) -> None:
    model = llm.llm_engine.core.model
    fused = model.fused_decoder
    assert fused is not None
    calls = []
    forward = fused.forward

    def counting(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls.append(out is not None)
        return out

    fused.forward = counting
    with_fused = _generate(llm, prompts, max_tokens)
    assert sum(calls) >= max_tokens - 1, "the fused step did not run the decode steps"
    model.fused_decoder = None
    try:
        op_by_op = _generate(llm, prompts, max_tokens)
    finally:
        model.fused_decoder = fused
    if model.norm.weight.dtype == torch.bfloat16:
        # The same kernels with the same arguments: the same logits, bit for bit (no sequence is long enough for
        # attention to split it differently across threads).
        assert with_fused == op_by_op
        return
    # float32: the same projection and attention kernels; the norms, rotary and activation are PyTorch's float32
    # arithmetic in C (another summation order): the same tokens, logprobs equal to float32 rounding.
    assert [tokens for tokens, _ in with_fused] == [tokens for tokens, _ in op_by_op]
    for (_, fused_logprobs), (_, reference) in zip(with_fused, op_by_op, strict=True):
        assert max(abs(a - b) for a, b in zip(fused_logprobs, reference, strict=True)) < 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("arch", "quantization"), [("llama", "int4"), ("mistral", "int4"), ("qwen2", "int8")])
def test_fused_decode_matches_op_by_op_on_tiny_models(tiny_models, arch, quantization, dtype):
    """Greedy tokens and their logprobs equal, one and (int4) three sequences at a time; mistral's layers attend
    within a 48-token window (the request runs past it), qwen2's q/k/v projections have biases; int4 weights with
    zero points (--quantization int4) and int8 per-channel ones; bfloat16 and float32 activations."""
    llm = tiny_llm(tiny_models[arch], quantization=quantization, dtype=dtype)
    _fused_vs_op_by_op(llm, PROMPTS[:1], 56)
    # As many sequences as the fused step takes (the rows its packed kernels take: int8 projections take one).
    rows = llm.llm_engine.core.model.fused_decoder.max_rows
    _fused_vs_op_by_op(llm, PROMPTS[:rows], 12)


@pytest.mark.slow  # the bundled model: ~5 s on a quiet 2-core machine
def test_fused_decode_matches_op_by_op_on_the_bundled_model():
    """The bundled model, Q4_1 kept packed: the same greedy answer with and without the fused step."""
    llm = LLM(show_progress=False, max_model_len=512)
    _fused_vs_op_by_op(llm, ["What is the capital of France? Answer in one word."], 24)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("step_threads", [1, 2])
def test_fused_step_computes_a_packed_output_layer(tmp_path, tiny_tokenizer_dir, dtype, step_threads):
    """A GGUF model (Q4_1 layers, the tied Q8_0 embedding as output layer): at one row the fused step computes the
    logits too, in its parallel region, with the op-by-op path's kernel; tokens and logprobs are the op-by-op
    path's, the output layer's columns on 1 and 2 threads. Three rows (more than the int8 output kernel takes
    packed) leave the logits to compute_logits."""
    from tests.model.quant_checkpoints import gguf_cache_dir

    types = dict.fromkeys(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), "Q4_1")
    llm = tiny_llm(gguf_cache_dir(tmp_path / "q4_1", tiny_tokenizer_dir, types | {"embed_tokens": "Q8_0"}),
                   dtype=dtype)
    fused = llm.llm_engine.core.model.fused_decoder
    assert fused is not None and fused.head_rows == 1 and fused.max_rows == quant.INT4_MAX_PACKED_ROWS
    fused._model.min_parallel_step = 0
    fused.step_threads = step_threads
    taken = []
    take = fused.take_logits

    def recording_take(hidden):
        logits = take(hidden)
        taken.append(logits is not None)
        return logits

    fused.take_logits = recording_take
    _fused_vs_op_by_op(llm, PROMPTS[:1], 24)
    assert sum(taken) >= 23 and all(taken[1:])  # every decode step's logits came from the fused step
    taken.clear()
    _fused_vs_op_by_op(llm, PROMPTS, 8)
    assert taken and not any(taken)  # three rows: the output layer ran op by op


def test_more_rows_than_the_packed_kernels_take_run_op_by_op(tiny_models):
    llm = tiny_llm(tiny_models["llama"], quantization="int4")
    fused = llm.llm_engine.core.model.fused_decoder
    assert fused is not None and fused.max_rows == quant.INT4_MAX_PACKED_ROWS < 10
    ran = []
    forward = fused.forward
    fused.forward = lambda *a, **kw: ran.append(forward(*a, **kw) is not None) or None  # count, then op by op
    out = llm.generate([f"{p} {i}" for i in range(5) for p in PROMPTS[:2]], SamplingParams(max_tokens=4, temperature=0),
                       use_tqdm=False)
    assert len(out) == 10 and ran and not any(ran)  # 10 decodes a step: never fused


def test_where_the_fused_step_does_not_apply(tiny_models, monkeypatch):
    def fused(arch: str = "llama", **kwargs):
        return tiny_llm(tiny_models[arch], **kwargs).llm_engine.core.model.fused_decoder

    # Full-precision weights (oneDNN's packed bf16 GEMM) and Qwen3's per-head q/k norms run op by op.
    assert fused() is None
    assert fused("qwen3", quantization="int8") is None
    # Batch-invariant kernels.
    assert fused(quantization="int8", batch_invariant=True) is None
    llm = tiny_llm(tiny_models["llama"], quantization="int8")
    model = llm.llm_engine.core.model
    assert model.fused_decoder is not None
    # Layers sharded over devices: the fused step has no all-reduce.
    assert FusedDecoder.build(model, tensor_parallel_size=2) is None

    class Stage:  # a pipeline stage: the layers of other stages are placeholders
        spec, norm, layers = model.spec, model.norm, [model.layers[0], torch.nn.Identity()]

    assert FusedDecoder.build(Stage) is None
    # The switch.
    monkeypatch.setenv(ENV_FLAG, "0")
    assert FusedDecoder.build(model) is None
    assert fused(quantization="int8") is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("step_threads", [2, 3])
@pytest.mark.parametrize(("arch", "quantization"), [("llama", "int4"), ("qwen2", "int8")])
def test_fused_decode_split_over_threads_matches_op_by_op(tiny_models, arch, quantization, step_threads, dtype):
    """The step's one parallel region, its projections' columns split over 2 or 3 threads (more threads than
    cores too: a descheduled thread holds the others at the barriers, never changes the result), gives the
    op-by-op path's tokens and logprobs; int4 and int8 (with biases) weights. A tiny model's step is below the
    work from which the step runs threads at all, lowered here."""
    llm = tiny_llm(tiny_models[arch], quantization=quantization, dtype=dtype)
    fused = llm.llm_engine.core.model.fused_decoder
    fused._model.min_parallel_step = 0
    fused.step_threads = step_threads
    _fused_vs_op_by_op(llm, PROMPTS[:fused.max_rows], 12)


def test_thread_chooser_runs_the_faster_count_and_keeps_measuring():
    from tokenmill.kernels.cpu.decode import ThreadChooser

    chooser = ThreadChooser(explore_every=4)
    assert chooser.pick(1, 1) == 1  # one thread available: nothing to choose
    # Each count is tried first, then the faster one runs, except every 4th step.
    times = {1: 0.010, 2: 0.030}
    picks = []
    for _ in range(12):
        n = chooser.pick(1, 2)
        picks.append(n)
        chooser.record(1, n, times[n])
    assert picks[:2] == [1, 2]
    assert picks[2:].count(1) >= 7 and 2 in picks[2:]
    # The machine gets quiet: two threads become faster, and the explored steps find it.
    times = {1: 0.010, 2: 0.004}
    for _ in range(40):
        n = chooser.pick(1, 2)
        chooser.record(1, n, times[n])
    assert [chooser.pick(1, 2) for _ in range(3)].count(2) >= 2
    # Rows are measured apart: a batch of 4 tries each count first.
    assert chooser.pick(4, 2) == 1
    chooser.record(4, 1, 0.02)
    assert chooser.pick(4, 2) == 2
