"""End to end through the engine: a finished output's text is tokenizer.decode(its token_ids), streamed or not,
for random-weight models sampling freely (so their outputs are full of partial and invalid UTF-8)."""

from __future__ import annotations

import pytest

from tests.tiny_models import build_sentencepiece_tokenizer, build_tiny_model
from tokenmill import LLM, SamplingParams


@pytest.fixture(scope="module")
def sp_model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sp_model")
    build_sentencepiece_tokenizer(root / "tokenizer")
    return build_tiny_model("llama", root / "llama", root / "tokenizer")


def _params(seed: int) -> list[SamplingParams]:
    return [
        SamplingParams(temperature=1.5, seed=seed + i, max_tokens=40, ignore_eos=True,
                       skip_special_tokens=bool(i % 2))
        for i in range(8)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["server_model_dir", "sp_model_dir"])
def test_final_text_equals_decode_of_token_ids(model, request):
    llm = LLM(str(request.getfixturevalue(model)), dtype="float32", kv_cache_memory="64MiB")
    tok = llm.get_tokenizer()
    prompts = ["Hello", "世界 🙂", "def main():", "Größe"] * 2
    params = _params(0)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    num_replacement = 0
    for out, p in zip(outputs, params, strict=True):
        completion = out.outputs[0]
        assert len(completion.token_ids) == 40
        assert completion.text == tok.decode(completion.token_ids, skip_special_tokens=p.skip_special_tokens)
        num_replacement += completion.text.count("\ufffd")
    assert num_replacement > 0  # the samples did exercise invalid / partial UTF-8

    # Streamed: every intermediate text is a prefix of the next, and the last equals decode().
    engine = llm.llm_engine
    shown: dict[str, str] = {}
    finals = {}
    for i, (prompt, p) in enumerate(zip(prompts, _params(100), strict=True)):
        engine.add_request(str(i), prompt, p)
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
            assert text.startswith(shown.get(out.request_id, ""))
            shown[out.request_id] = text
            if out.finished:
                finals[out.request_id] = out.outputs[0]
    for i, p in enumerate(_params(100)):
        completion = finals[str(i)]
        assert completion.text == tok.decode(completion.token_ids, skip_special_tokens=p.skip_special_tokens)
