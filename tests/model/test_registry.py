"""The engine's model spec comes from the planner's parser (one reading of config.json), and agrees with
transformers on which layers use a sliding window."""

from __future__ import annotations

import json

import pytest
import torch

from tests.tiny_models import build_tiny_model
from tokenmill import LLM, SamplingParams
from tokenmill.model.registry import DecoderSpec
from tokenmill.planner.arch import ModelArch

WINDOW = 8


def _qwen2_config(**overrides):
    import transformers

    kwargs = dict(
        vocab_size=387, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, use_sliding_window=True, sliding_window=WINDOW,
        max_window_layers=2, tie_word_embeddings=True, initializer_range=0.1,
    )
    kwargs.update(overrides)
    return transformers.Qwen2Config(**kwargs)


def _config_dict(config) -> dict:
    """config.json as an older transformers writes it: no layer_types (max_window_layers decides)."""
    data = json.loads(config.to_json_string())
    data.pop("layer_types", None)
    return data


@pytest.mark.parametrize("overrides", [
    {},  # layers 2 and 3 windowed
    {"max_window_layers": 0},  # every layer
    {"max_window_layers": 4},  # none
    {"use_sliding_window": False},  # none: the window is off
])
def test_qwen2_layer_windows_equal_transformers(overrides):
    import transformers

    config = _qwen2_config(**overrides)
    data = _config_dict(config)
    spec = DecoderSpec.from_hf_config(data)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**data))
    expected = [layer.self_attn.sliding_window for layer in model.model.layers]
    assert [spec.layer_sliding_window(i) for i in range(spec.num_layers)] == expected
    # The planner reads the same layers (it is the same parser).
    arch = ModelArch.from_hf_config(data)
    assert [WINDOW if i in arch.sliding_window_layers else None for i in range(4)] == expected


def test_spec_is_built_from_the_planner_arch():
    data = _config_dict(_qwen2_config(rope_scaling={"rope_type": "linear", "factor": 2.0}, rms_norm_eps=1e-5))
    arch = ModelArch.from_hf_config(data)
    spec = DecoderSpec.from_arch(arch)
    assert spec == DecoderSpec.from_hf_config(data)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.qkv_bias, spec.o_bias) == (4, 2, 16, True, False)
    assert spec.rope_scaling["rope_type"] == "linear" and spec.rope_scaling["factor"] == 2.0
    assert spec.rms_norm_eps == 1e-5
    with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
        DecoderSpec.from_hf_config({**data, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="mixture-of-experts"):
        DecoderSpec.from_hf_config({**data, "model_type": "qwen2", "num_experts": 4, "num_experts_per_tok": 2})


@pytest.mark.slow
def test_qwen2_partial_sliding_window_greedy_equals_transformers(tmp_path, tiny_tokenizer_dir):
    """A tiny Qwen2 whose last two of four layers attend to the last 8 tokens, on prompts longer than that."""
    import transformers

    model_dir = build_tiny_model("qwen2", tmp_path / "qwen2", tiny_tokenizer_dir)
    data = _config_dict(_qwen2_config(vocab_size=json.loads((model_dir / "config.json").read_text())["vocab_size"]))
    torch.manual_seed(0)
    reference = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**data)).eval()
    reference.save_pretrained(model_dir, safe_serialization=True)
    (model_dir / "config.json").write_text(json.dumps(data))  # without layer_types, as older checkpoints

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, data["vocab_size"], (n,), generator=g).tolist() for n in (5, 20, 37, 64)]
    expected = []
    with torch.no_grad():
        for p in prompts:
            out = reference.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False)
            expected.append(out[0, len(p):].tolist())
    llm = LLM(str(model_dir), dtype="float32", show_progress=False)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert llm.llm_engine.core.spec.sliding_window_layers == (2, 3)
