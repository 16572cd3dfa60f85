"""Sampling behaviour per request inside mixed batches."""

from __future__ import annotations

import pytest
import torch

from tokenmill import LLM, SamplingParams

MAX_TOKENS = 16


@pytest.fixture(scope="module")
def llm(llama_dir) -> LLM:
    return LLM(str(llama_dir), dtype="float32", show_progress=False, seed=7)


@pytest.fixture(scope="module")
def ref_model(llama_dir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()


def prompts(n: int, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(3, 384, (int(k),), generator=g).tolist()}
            for k in torch.randint(4, 60, (n,), generator=g)]


def test_seeded_request_same_alone_and_in_busy_batch(llm):
    target = prompts(1, seed=99)[0]
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=MAX_TOKENS)
    alone = llm.generate([target], params, use_tqdm=False)[0].outputs[0]
    busy = prompts(15)
    mates = [SamplingParams(temperature=0.8, max_tokens=MAX_TOKENS + i % 5) for i in range(15)]
    outs = llm.generate(busy[:7] + [target] + busy[7:], mates[:7] + [params] + mates[7:], use_tqdm=False)
    assert outs[7].outputs[0].token_ids == alone.token_ids
    assert outs[7].outputs[0].text == alone.text
    # Another seed gives another sample (the draw is not greedy).
    other = llm.generate([target], SamplingParams(temperature=1.0, seed=4321, max_tokens=MAX_TOKENS), use_tqdm=False)
    assert other[0].outputs[0].token_ids != alone.token_ids


def test_top_k_1_equals_greedy(llm):
    ps = prompts(6)
    greedy = llm.generate(ps, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    top1 = llm.generate(ps, SamplingParams(temperature=1.5, top_k=1, max_tokens=MAX_TOKENS), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in greedy] == [o.outputs[0].token_ids for o in top1]


def test_stop_token_ids_and_stop_strings(llm):
    p = prompts(1, seed=5)
    full = llm.generate(p, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == MAX_TOKENS
    # stop_token_ids: output ends at the first occurrence of the token, which is kept in token_ids.
    stop_tok = full.token_ids[5]
    first = full.token_ids.index(stop_tok)
    out = llm.generate(p, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[stop_tok]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == full.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    # stop strings: the text ends right before the stop string, which is excluded.
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text.index(stop)
    out = llm.generate(p, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop=["zzzz-never", stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == text[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    kept = llm.generate(p, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop=stop,
                                          include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == text[: cut + len(stop)]


def test_min_tokens_blocks_stop_tokens(llm):
    p = prompts(1, seed=5)
    full = llm.generate(p, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)[0].outputs[0]
    first = full.token_ids[0]
    out = llm.generate(p, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[first],
                                         min_tokens=4), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 4
    assert first not in out.token_ids[:3]


def test_logprobs_match_reference_log_softmax(llm, ref_model):
    ps = prompts(3, seed=11)
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=8, logprobs=5, prompt_logprobs=3),
                        use_tqdm=False)
    for prompt, out in zip(ps, outs, strict=True):
        ids = prompt["prompt_token_ids"] + out.outputs[0].token_ids
        with torch.no_grad():
            ref = torch.log_softmax(ref_model(torch.tensor([ids])).logits[0].float(), dim=-1)
        n = len(prompt["prompt_token_ids"])
        completion = out.outputs[0]
        assert len(completion.logprobs) == len(completion.token_ids)
        for step, (tok, position) in enumerate(zip(completion.token_ids, completion.logprobs, strict=True)):
            row = ref[n - 1 + step]
            assert position[tok].logprob == pytest.approx(row[tok].item(), abs=1e-4)
            assert position[tok].rank == 1  # greedy
            top = row.topk(5)
            for rank, (val, tid) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True), 1):
                assert position[tid].logprob == pytest.approx(val, abs=1e-4)
                assert position[tid].rank == rank
                assert position[tid].decoded_token is not None
        assert completion.cumulative_logprob == pytest.approx(
            sum(p[t].logprob for t, p in zip(completion.token_ids, completion.logprobs, strict=True)), abs=1e-4)
        # Prompt logprobs: position 0 has none; position i scores prompt token i given the tokens before it.
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == n
        for i in range(1, n):
            tok = prompt["prompt_token_ids"][i]
            assert out.prompt_logprobs[i][tok].logprob == pytest.approx(ref[i - 1, tok].item(), abs=1e-4)
            assert out.prompt_logprobs[i][tok].rank == int((ref[i - 1] > ref[i - 1, tok]).sum()) + 1


def test_n_samples_share_prompt_and_are_reproducible(llm):
    p = prompts(1, seed=21)
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=MAX_TOKENS)
    a = llm.generate(p, params, use_tqdm=False)[0]
    b = llm.generate(p, params, use_tqdm=False)[0]
    assert [o.index for o in a.outputs] == [0, 1, 2]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1


def test_penalties_change_repetitive_output(llm):
    p = prompts(4, seed=3)
    plain = llm.generate(p, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    penalized = llm.generate(p, SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.8,
                                               frequency_penalty=1.5, presence_penalty=1.0), use_tqdm=False)

    def distinct(outs):
        return sum(len(set(o.outputs[0].token_ids)) for o in outs)

    assert distinct(penalized) > distinct(plain)


@pytest.mark.parametrize("kwargs, name", [
    ({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_k": -3}, "top_k"),
    ({"min_p": 1.5}, "min_p"), ({"n": 0}, "n"), ({"max_tokens": 0}, "max_tokens"),
    ({"presence_penalty": 3.0}, "presence_penalty"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"logprobs": 50}, "logprobs"), ({"stop": [""]}, "stop"), ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"seed": 1.5}, "seed"),
])
def test_invalid_sampling_params_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_prompt_longer_than_max_model_len_is_rejected_with_numbers(llama_dir):
    llm = LLM(str(llama_dir), dtype="float32", max_model_len=64, show_progress=False)
    with pytest.raises(ValueError, match=r"prompt has 80 tokens, max_model_len is 64"):
        llm.generate([{"prompt_token_ids": [5] * 80}], use_tqdm=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([{"prompt_token_ids": [5, 100000]}], use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([{"prompt_token_ids": []}], use_tqdm=False)
    # Nothing half-submitted: the engine is idle and still works.
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.generate([{"prompt_token_ids": [5] * 10}], SamplingParams(max_tokens=3), use_tqdm=False)


def test_text_prompts_and_chat(llm):
    outs = llm.generate(["The quick brown fox", "Paged attention"], SamplingParams(temperature=0, max_tokens=5),
                        use_tqdm=False)
    assert [o.prompt for o in outs] == ["The quick brown fox", "Paged attention"]
    tok = llm.get_tokenizer()
    assert outs[0].prompt_token_ids == tok.encode("The quick brown fox")
    chat = llm.chat([{"role": "user", "content": "hello"}], SamplingParams(temperature=0, max_tokens=5),
                    use_tqdm=False)
    assert chat[0].prompt == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert chat[0].prompt_token_ids[0] == tok.token_to_id("<|im_start|>")
