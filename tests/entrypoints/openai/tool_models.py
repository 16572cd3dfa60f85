"""A tiny random-weight model for tool calling: the test tokenizer plus Hermes' <tool_call> and </tool_call>
tokens (added, not special, as Qwen 2.5 has them), a Hermes/Qwen-style tool chat template, and optionally an
"eager" tweak of its weights so that, wherever the grammar allows it, it writes <tool_call>: a forced opening
for tests of auto mode, whose continuation only the grammar makes valid."""

from __future__ import annotations

import json
from pathlib import Path

from tests.tiny_models import build_tiny_model, build_tokenizer

# Qwen 2.5's tool template, shortened: tools in the system turn, calls in <tool_call> blocks, results in
# <tool_response> blocks of a user turn.
HERMES_CHAT_TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}

{% endif %}# Tools

You may call one or more functions. Function signatures are within <tools></tools>:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>

For each call, return a json object with the function name and arguments within <tool_call></tool_call>:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0]['role'] == 'system' %}<|im_start|>system
{{ messages[0]['content'] }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}
{%- elif message.role == 'assistant' %}<|im_start|>assistant
{% if message.content %}{{ message.content }}{% endif %}
{%- for tool_call in message.tool_calls | default([]) %}
{%- if loop.first and message.content %}
{% elif not loop.first %}
{% endif %}<tool_call>
{"name": "{{ tool_call.function.name }}", "arguments": {{ tool_call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

TOOL_TOKENS = ("<tool_call>", "</tool_call>")


def build_tool_model(path: Path, eager: bool = False) -> Path:
    """The tiny Llama with the tool tokens and template; eager: <tool_call> is the likeliest token everywhere."""
    from tokenizers import AddedToken, Tokenizer

    tokenizer_dir = path.parent / (path.name + "-tokenizer")
    build_tokenizer(tokenizer_dir)
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
    tok.save(str(tokenizer_dir / "tokenizer.json"))
    (tokenizer_dir / "chat_template.jinja").write_text(HERMES_CHAT_TEMPLATE)
    build_tiny_model("llama", path, tokenizer_dir)
    # Tool definitions make long prompts for a 384-token vocabulary: room for them and the calls.
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config["max_position_embeddings"] = 2048
    config_file.write_text(json.dumps(config))
    if eager:
        from safetensors.torch import load_file, save_file

        weights_file = path / "model.safetensors"
        weights = load_file(str(weights_file))
        tool_call_id = tok.token_to_id("<tool_call>")
        embed = weights["model.embed_tokens.weight"]  # [vocab, hidden]
        # A large constant in hidden dimension 0 of every embedding keeps the final normed state positive
        # there; lm_head reads only that dimension for <tool_call>, so its logit dominates.
        embed[:, 0] = 8.0
        lm_head = weights["lm_head.weight"]  # [vocab, hidden]
        lm_head[:, 0] = 0.0
        lm_head[tool_call_id, 0] = 20.0
        save_file(weights, str(weights_file), metadata={"format": "pt"})
    return path

