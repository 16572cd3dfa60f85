"""Batch-invariant mode: bfloat16 greedy and seeded outputs identical whatever the batch mates."""

from __future__ import annotations

import random

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.attention.backend import AttentionMetadata
from tokenmill.attention.cpu_backend import CPUAttentionBackend
from tokenmill.config import EngineConfig
from tokenmill.kernels.cpu import ops as cpu_kernels
from tokenmill.worker.batch_invariant import ROW_TILE, RowTiledLinear, tile_linear_rows

pytestmark = pytest.mark.skipif(not cpu_kernels.supports(torch.bfloat16),
                                reason="the native CPU kernels could not be built here")

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 4, 2, 32, 16


def attend_token(backend: CPUAttentionBackend, kv_cache: torch.Tensor, query: torch.Tensor, target_len: int,
                 others: list[tuple[int, int]], chunk: int = 1) -> torch.Tensor:
    """Attention output of the target sequence's last token (position target_len - 1), computed in a batch
    with other sequences (query_len, seq_len) and the target's last `chunk` tokens as its query."""
    g = torch.Generator().manual_seed(len(others) * 100 + chunk)
    seqs = others + [(chunk, target_len)]
    tables = torch.zeros(len(seqs), kv_cache.shape[1], dtype=torch.int32)
    starts = [0]
    for i, (query_len, _) in enumerate(seqs):
        starts.append(starts[-1] + query_len)
        tables[i] = torch.randperm(kv_cache.shape[1], generator=g).to(torch.int32)
    tables[-1] = torch.arange(kv_cache.shape[1], dtype=torch.int32)  # the target's blocks, always the same
    q = torch.randn(starts[-1], NUM_HEADS, HEAD_DIM, generator=g).to(torch.bfloat16)
    q[-1] = query
    meta = AttentionMetadata.build(starts, [s for _, s in seqs], tables, torch.zeros(starts[-1], dtype=torch.long))
    k = torch.randn(starts[-1], NUM_KV_HEADS, HEAD_DIM, generator=g).to(torch.bfloat16)
    return backend.attend(q, k, k, kv_cache, meta)[-1]


@pytest.fixture(scope="module")
def kv_cache() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 24, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, generator=g).to(torch.bfloat16)


def test_attention_of_a_token_does_not_depend_on_the_batch(kv_cache):
    query = torch.randn(NUM_HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    target_len = 300  # long enough that a decode alone is split across threads (flash-decoding)
    layouts = [dict(others=[]), dict(others=[(1, 40)] * 7), dict(others=[(1, 200), (30, 90)]),
               dict(others=[], chunk=12), dict(others=[(1, 17)] * 3, chunk=40)]
    invariant = CPUAttentionBackend(NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, HEAD_DIM**-0.5, batch_invariant=True)
    results = [attend_token(invariant, kv_cache, query, target_len, **layout) for layout in layouts]
    for result in results[1:]:
        assert torch.equal(result, results[0])
    # The default kernels' order depends on the batch: alone the decode is split, beside 7 others it is not,
    # and a prefill chunk goes through SDPA; the results differ in the last bits.
    default = CPUAttentionBackend(NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, HEAD_DIM**-0.5)
    if torch.get_num_threads() > 1:
        defaults = [attend_token(default, kv_cache, query, target_len, **layout) for layout in layouts]
        assert any(not torch.equal(d, defaults[0]) for d in defaults[1:])
        torch.testing.assert_close(defaults[0], results[0], rtol=2e-2, atol=2e-2)


def test_row_tiled_linear_gives_each_row_the_same_result_whatever_the_rows():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 80).to(torch.bfloat16)
    tiled = RowTiledLinear(linear, 96, 80)
    x = torch.randn(3 * ROW_TILE + 5, 96).to(torch.bfloat16)
    ref = tiled(x[:1])[0]
    for n in (2, ROW_TILE - 1, ROW_TILE, ROW_TILE + 1, 3 * ROW_TILE + 5):
        rows = torch.cat((x[1:n], x[:1]))  # the row at the end, beside n - 1 others
        assert torch.equal(tiled(rows)[-1], ref)
    assert tiled(x.view(1, -1, 96)).shape == (1, x.shape[0], 80)
    torch.testing.assert_close(tiled(x), linear(x), rtol=1e-2, atol=1e-2)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    assert tile_linear_rows(model) == 2 and tile_linear_rows(model) == 0


def test_batch_invariant_is_a_flag_an_argument_and_an_environment_variable(monkeypatch):
    assert EngineConfig.from_kwargs().model.batch_invariant is False
    assert EngineConfig.from_kwargs(batch_invariant=True).model.batch_invariant is True
    monkeypatch.setenv("TOKENMILL_BATCH_INVARIANT", "1")
    assert EngineConfig.from_kwargs().model.batch_invariant is True
    assert EngineConfig.from_kwargs(batch_invariant=False).model.batch_invariant is False
    monkeypatch.setenv("TOKENMILL_BATCH_INVARIANT", "maybe")
    with pytest.raises(ValueError, match="TOKENMILL_BATCH_INVARIANT='maybe'"):
        EngineConfig.from_kwargs()
    from tokenmill.entrypoints.cli import build_parser
    from tokenmill.entrypoints.generate_cli import engine_kwargs

    args = build_parser().parse_args(["generate", "--batch-invariant", "-p", "x"])
    assert engine_kwargs(args)["batch_invariant"] is True
    args = build_parser().parse_args(["generate", "-p", "x"])
    assert engine_kwargs(args)["batch_invariant"] is None


def test_batch_invariant_is_refused_where_it_is_not_implemented(tiny_models, monkeypatch):
    from tokenmill.engine.engine_core import make_attention_backend
    from tokenmill.model.loader import read_hf_config
    from tokenmill.model.registry import DecoderSpec

    spec = DecoderSpec.from_hf_config(read_hf_config(tiny_models["qwen3"]))
    with pytest.raises(ValueError, match="CPU only"):
        make_attention_backend(spec, torch.device("cuda"), torch.bfloat16, batch_invariant=True)
    monkeypatch.setattr(cpu_kernels, "supports", lambda dtype: False)
    with pytest.raises(ValueError, match="needs the native CPU kernels"):
        make_attention_backend(spec, torch.device("cpu"), torch.bfloat16, batch_invariant=True)


def random_prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(3, 384) for _ in range(length)]


@pytest.mark.slow  # 10-60 s: mixed batches through a bf16 engine
def test_bf16_greedy_and_seeded_outputs_are_identical_whatever_the_batch(tiny_models):
    # qwen3: head_dim 32 takes the vectorized decode kernel (the one that splits sequences by default).
    # A small token budget cuts prompts into chunks that depend on what else is scheduled.
    llm = LLM(str(tiny_models["qwen3"]), dtype="bfloat16", batch_invariant=True, max_num_batched_tokens=48,
              kv_cache_memory=8 * 2**20, show_progress=False)
    rng = random.Random(0)
    targets = [
        (random_prompt(rng, 70), SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)),
        (random_prompt(rng, 9), SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)),
        (random_prompt(rng, 33), SamplingParams(temperature=0.8, seed=11, max_tokens=16, ignore_eos=True)),
        (random_prompt(rng, 120), SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=16, ignore_eos=True)),
    ]
    alone = [llm.generate([p], [sp], use_tqdm=False)[0].outputs[0].token_ids for p, sp in targets]
    for trial in range(5):
        mates = []
        for _ in range(rng.randrange(1, 8)):
            kind = rng.random()
            params = (SamplingParams(temperature=0, max_tokens=rng.randrange(1, 30)) if kind < 0.4 else
                      SamplingParams(temperature=0.7, seed=rng.randrange(100), max_tokens=rng.randrange(1, 30))
                      if kind < 0.7 else SamplingParams(temperature=1.0, max_tokens=rng.randrange(1, 30)))
            mates.append((random_prompt(rng, rng.randrange(1, 100)), params))
        # A shared prefix now and then: a mate hits the prefix cache of a target, or the other way round.
        if trial % 2:
            mates.append((targets[0][0][:48] + random_prompt(rng, 20), SamplingParams(temperature=0, max_tokens=5)))
        batch = [(t, p, sp) for t, (p, sp) in enumerate(targets)] + [(None, p, sp) for p, sp in mates]
        rng.shuffle(batch)
        outs = llm.generate([{"prompt_token_ids": p} for _, p, _ in batch], [sp for _, _, sp in batch],
                            use_tqdm=False)
        for (target, _, _), out in zip(batch, outs, strict=True):
            if target is not None:
                assert out.outputs[0].token_ids == alone[target], f"trial {trial}, target {target}"
