"""Pooling (embedding) requests: LLM.embed against transformers' final hidden states, beside generation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill import LLM, EmbeddingRequestOutput, PoolingParams, SamplingParams

TEXTS = ["Paged attention stores keys", "The quick brown fox jumps over the lazy dog. " * 8, "x"]


def hf_reference(model_dir, token_ids: list[int], pooling_type: str, normalize: bool = True) -> torch.Tensor:
    """transformers' last hidden state (after the final norm), pooled."""
    model = _hf_model(model_dir)
    with torch.no_grad():
        hidden = model(torch.tensor([token_ids]), output_hidden_states=True).hidden_states[-1][0]
    pooled = hidden[-1] if pooling_type == "LAST" else hidden.mean(dim=0)
    return F.normalize(pooled, dim=-1) if normalize else pooled


_HF_MODELS: dict = {}


def _hf_model(model_dir):
    import transformers

    if model_dir not in _HF_MODELS:
        _HF_MODELS[model_dir] = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return _HF_MODELS[model_dir]


@pytest.fixture(scope="module")
def llm(server_model_dir) -> LLM:
    # A small step budget: the long prompt is pooled over several prefill chunks.
    return LLM(str(server_model_dir), dtype="float32", kv_cache_memory="16MiB", max_model_len=512,
               max_num_batched_tokens=32, show_progress=False)


def hf_token_ids(model_dir, text: str) -> list[int]:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"]


@pytest.mark.parametrize("pooling_type", ["LAST", "MEAN"])
def test_embed_equals_transformers(llm, server_model_dir, pooling_type):
    ids = [hf_token_ids(server_model_dir, t) for t in TEXTS]
    assert len(ids[1]) > 64  # pooled over at least three chunks of 32 tokens
    token_prompt = list(range(5, 45))
    outputs = llm.embed([*TEXTS, token_prompt, {"prompt_token_ids": ids[0]}],
                        PoolingParams(pooling_type=pooling_type), use_tqdm=False)
    assert all(isinstance(o, EmbeddingRequestOutput) and o.finished for o in outputs)
    for output, token_ids in zip(outputs, [*ids, token_prompt, ids[0]], strict=True):
        assert output.prompt_token_ids == token_ids
        vector = torch.tensor(output.outputs.embedding)
        assert output.outputs.hidden_size == 64
        torch.testing.assert_close(vector, hf_reference(server_model_dir, token_ids, pooling_type),
                                   atol=2e-5, rtol=1e-4)
        assert vector.norm().item() == pytest.approx(1.0, abs=1e-5)


def test_embed_without_normalization(llm, server_model_dir):
    ids = hf_token_ids(server_model_dir, TEXTS[0])
    for pooling_type in ("LAST", "MEAN"):
        [output] = llm.embed(TEXTS[0], PoolingParams(pooling_type=pooling_type, normalize=False), use_tqdm=False)
        torch.testing.assert_close(torch.tensor(output.outputs.embedding),
                                   hf_reference(server_model_dir, ids, pooling_type, normalize=False),
                                   atol=2e-5, rtol=1e-4)


def test_prefix_cache_hits_for_last_token_pooling_only(llm):
    prompt = "A shared prefix long enough to fill blocks of sixteen tokens. " * 3
    llm.llm_engine.core.kv_cache_manager.reset_prefix_cache()
    [first] = llm.embed(prompt, PoolingParams(pooling_type="LAST"), use_tqdm=False)
    [second] = llm.embed(prompt, PoolingParams(pooling_type="LAST"), use_tqdm=False)
    # LAST needs only the last position computed: the cached prefix is reused, the vector is the same.
    assert first.num_cached_tokens == 0 and second.num_cached_tokens > 0
    assert second.outputs.embedding == pytest.approx(first.outputs.embedding, abs=1e-5)
    # MEAN needs every position's hidden state: no cache hit, same vector as computed from scratch.
    [mean_again] = llm.embed(prompt, PoolingParams(pooling_type="MEAN"), use_tqdm=False)
    assert mean_again.num_cached_tokens == 0
    llm.llm_engine.core.kv_cache_manager.reset_prefix_cache()
    [mean_fresh] = llm.embed(prompt, PoolingParams(pooling_type="MEAN"), use_tqdm=False)
    assert mean_again.outputs.embedding == pytest.approx(mean_fresh.outputs.embedding, abs=1e-6)
    llm.llm_engine.core.scheduler.check_integrity()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_pooling_beside_generation(server_model_dir, async_scheduling):
    """Pooling and generation requests share steps; neither changes the other's result, and no block leaks."""
    llm = LLM(str(server_model_dir), dtype="float32", kv_cache_memory="16MiB", max_model_len=512,
              max_num_batched_tokens=24, async_scheduling=async_scheduling, show_progress=False)
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(TEXTS[:2], greedy, use_tqdm=False)]
    engine = llm.llm_engine
    for i, text in enumerate(TEXTS[:2]):
        engine.add_request(f"gen-{i}", text, greedy)
    engine.step()  # generation is under way when the pooling requests arrive
    for i, pooling_type in enumerate(["LAST", "MEAN", "LAST"]):
        engine.add_pooling_request(f"pool-{i}", TEXTS[i % 2], PoolingParams(pooling_type=pooling_type))
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            engine.core.scheduler.check_integrity()
            if output.finished:
                finished[output.request_id] = output
    assert [finished[f"gen-{i}"].outputs[0].token_ids for i in range(2)] == alone
    for i, pooling_type in enumerate(["LAST", "MEAN", "LAST"]):
        output = finished[f"pool-{i}"]
        assert isinstance(output, EmbeddingRequestOutput)
        expected = hf_reference(server_model_dir, output.prompt_token_ids, pooling_type)
        torch.testing.assert_close(torch.tensor(output.outputs.embedding), expected, atol=2e-5, rtol=1e-4)
    assert engine.core.kv_cache_manager.req_to_blocks == {}


def test_abort_pooling_request(llm):
    engine = llm.llm_engine
    engine.add_pooling_request("to-abort", TEXTS[1], PoolingParams())
    engine.step()  # first chunk computed
    engine.abort_request("to-abort")
    assert not engine.has_unfinished_requests()
    assert engine.core.kv_cache_manager.req_to_blocks == {}


def test_bad_pooling_options(llm, server_model_dir):
    with pytest.raises(ValueError, match="pooling_type='CLS' is not supported"):
        PoolingParams(pooling_type="CLS")
    with pytest.raises(ValueError, match="pooling_type"):
        LLM(str(server_model_dir), pooling_type="cls", show_progress=False)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.embed([[5] * 600], use_tqdm=False)
    with pytest.raises(ValueError, match="got 2 pooling_params for 1 prompts"):
        llm.embed("x", [PoolingParams(), PoolingParams()], use_tqdm=False)


def test_engine_pooling_type_is_the_default(server_model_dir):
    llm = LLM(str(server_model_dir), dtype="float32", kv_cache_memory="16MiB", max_model_len=512,
              pooling_type="mean", show_progress=False)
    [output] = llm.embed(TEXTS[0], use_tqdm=False)
    expected = hf_reference(server_model_dir, output.prompt_token_ids, "MEAN")
    torch.testing.assert_close(torch.tensor(output.outputs.embedding), expected, atol=2e-5, rtol=1e-4)


def test_pooling_type_flag():
    from tokenmill.config import EngineConfig
    from tokenmill.entrypoints.cli import build_parser
    from tokenmill.entrypoints.generate_cli import engine_kwargs

    args = build_parser().parse_args(["serve", "--pooling-type", "mean"])
    assert engine_kwargs(args)["pooling_type"] == "MEAN"
    assert build_parser().parse_args(["serve"]).pooling_type == "LAST"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--pooling-type", "cls"])
    assert EngineConfig.from_kwargs(pooling_type="mean").model.pooling_type == "MEAN"
