"""The engine's tokenizer: a Hugging Face tokenizer.json run by the `tokenizers` library, plus chat templates.

It reads the same files as transformers' AutoTokenizer (tokenizer.json, tokenizer_config.json,
generation_config.json, chat_template.jinja) and reproduces its results for encode, decode and
apply_chat_template, without importing transformers.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer

# transformers' named special tokens (SpecialTokensMixin.SPECIAL_TOKENS_ATTRIBUTES), in its order.
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

# How the model's decoder turns tokens into text, as far as partial UTF-8 characters are concerned:
# "byte_level" (GPT-2 style: every token spells bytes in a 256-character alphabet), "byte_fallback"
# (SentencePiece style: <0xNN> tokens each stand for one byte), or None (tokens are whole text).
BYTE_LEVEL = "byte_level"
BYTE_FALLBACK = "byte_fallback"
_BYTE_FALLBACK_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class InvalidTextError(ValueError):
    """Text that cannot be tokenized because it is not valid Unicode (a lone UTF-16 surrogate)."""


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table, in which byte-level BPE vocabularies spell their tokens."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_BYTE_LEVEL_DECODE = {char: byte for byte, char in byte_level_alphabet().items()}


class Tokenizer:
    """Text <-> token ids for one model, and its chat template.

    Construct with Tokenizer.from_pretrained(model_dir). Matches transformers' tokenizer on the same directory:
    - special tokens named in tokenizer_config.json are added as special tokens when tokenizer.json lacks them;
    - tokenizer.json's post-processor alone decides which tokens encode(add_special_tokens=True) adds:
      transformers ignores add_bos_token / add_eos_token in tokenizer_config.json when tokenizer.json exists
      (the GGUF converter therefore writes BOS handling into tokenizer.json);
    - decode(skip_special_tokens=True) drops tokens marked special.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        special_tokens: dict[str, str] | None = None,
        extra_special_tokens: tuple[str, ...] = (),
        chat_templates: dict[str, str] | None = None,
        generation_eos_token_ids: tuple[int, ...] = (),
        clean_up_tokenization_spaces: bool = False,
    ):
        self.backend = backend
        # "bos_token" / "eos_token" / ... -> token text, only the ones that are set
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        self.extra_special_tokens = tuple(extra_special_tokens)
        # template name -> jinja source; "default" is the one used unless another is asked for
        self.chat_templates: dict[str, str] = dict(chat_templates or {})
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        # Looked up once: the engine reads these for every generated token.
        self._special_ids = {name: backend.token_to_id(token) for name, token in self.special_tokens.items()}
        eos_ids = set(generation_eos_token_ids)
        if self._special_ids.get("eos_token") is not None:
            eos_ids.add(self._special_ids["eos_token"])
        self._eos_token_ids = frozenset(eos_ids)
        special_ids = {
            backend.token_to_id(t) for t in (*self.special_tokens.values(), *self.extra_special_tokens)
        }
        special_ids |= {i for i, token in backend.get_added_tokens_decoder().items() if token.special}
        self._all_special_ids = sorted(i for i in special_ids if i is not None)

    @property
    def clean_up_tokenization_spaces(self) -> bool:
        return self._clean_up_spaces

    @clean_up_tokenization_spaces.setter
    def clean_up_tokenization_spaces(self, value: bool) -> None:
        self._clean_up_spaces = bool(value)
        # transformers applies this WordPiece-era cleanup only to non-BPE models; it would corrupt BPE output.
        # Decided once here: decode() runs for every generated token.
        self._clean_up = self._clean_up_spaces and type(self.backend.model).__name__ != "BPE"

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load from a model directory holding tokenizer.json (+ optional tokenizer_config.json,
        generation_config.json, chat_template.jinja)."""
        model_dir = Path(path)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"{tokenizer_file} not found: tokenmill needs a Hugging Face fast tokenizer (tokenizer.json). "
                "Save one with transformers' tokenizer.save_pretrained(), or pass a .gguf file instead."
            )
        try:
            backend = BackendTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(
                f"{tokenizer_file} cannot be read ({e}); restore it from the model's release."
            ) from e
        config = _read_json_object(model_dir / "tokenizer_config.json")
        generation_config = _read_json_object(model_dir / "generation_config.json")

        special_tokens = {}
        for name in SPECIAL_TOKEN_NAMES:
            content = _token_content(config.get(name))
            if content is not None:
                special_tokens[name] = content
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        extra_special_tokens = (
            tuple(c for c in (_token_content(t) for t in extra) if c is not None)
            if isinstance(extra, list)
            else ()
        )
        _add_missing_tokens(backend, config, special_tokens, extra_special_tokens)

        chat_templates = _chat_templates(
            config.get("chat_template"), tokenizer_config=model_dir / "tokenizer_config.json"
        )
        template_file = model_dir / "chat_template.jinja"
        if template_file.is_file():  # takes precedence over tokenizer_config.json, as in transformers
            chat_templates["default"] = template_file.read_text(encoding="utf-8")

        eos_ids = generation_config.get("eos_token_id")
        eos_ids = [eos_ids] if isinstance(eos_ids, int) else (eos_ids or [])
        return cls(
            backend,
            special_tokens=special_tokens,
            extra_special_tokens=extra_special_tokens,
            chat_templates=chat_templates,
            generation_eos_token_ids=tuple(int(i) for i in eos_ids),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        )

    # ---------------------------------------------------------------------------------------------------------
    # Vocabulary

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (len(tokenizer) in transformers)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_ids.get("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_ids.get("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_ids.get("pad_token")

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end generation: the tokenizer's eos token and generation_config.json's eos_token_id(s)."""
        return self._eos_token_ids

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the named special tokens, the additional special tokens and every added token marked special."""
        return list(self._all_special_ids)

    @property
    def add_bos_token(self) -> bool:
        """Whether encode(text) starts with the bos token."""
        ids = self.backend.encode("", add_special_tokens=True).ids
        return bool(ids) and ids[0] == self.bos_token_id

    def id_to_token(self, token_id: int) -> str:
        token = self.backend.id_to_token(token_id)
        if token is None:
            raise ValueError(f"token id {token_id} is not in the vocabulary (ids 0..{self.vocab_size - 1})")
        return token

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    # ---------------------------------------------------------------------------------------------------------
    # Encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special-token text inside it ("<|im_start|>") becomes the special token."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        try:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            check_valid_text(text)  # names the lone surrogate the tokenizers library refused
            raise

    def decode(
        self, ids: list[int], skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True
    ) -> str:
        """Text of `ids`. spaces_between_special_tokens=False (vLLM's option; only with skip_special_tokens=False)
        drops whatever separator the decoder puts between two consecutive added tokens: each added token that
        follows another contributes exactly its own text, as in vLLM's detokenizer."""
        ids = ids if type(ids) is list else list(ids)
        if not spaces_between_special_tokens and not skip_special_tokens:
            runs = [i for i in range(1, len(ids)) if ids[i] in self._added_ids and ids[i - 1] in self._added_ids]
            if runs:
                return self._decode_joined(ids, runs)
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if self._clean_up:
            text = _clean_up_tokenization(text)
        return text

    def _decode_joined(self, ids: list[int], joined: list[int]) -> str:
        """decode(), with the text of each token at an index in `joined` replaced by its raw content."""
        parts = []
        done = ""  # text of ids[:start] as the decoder renders it
        start = 0
        for i in joined:
            before = self.decode(ids[:i], skip_special_tokens=False)
            parts.append(before[len(done) :] if before.startswith(done) else before)
            parts.append(self._added_ids[ids[i]])
            done = self.decode(ids[: i + 1], skip_special_tokens=False)
            start = i + 1
        full = self.decode(ids, skip_special_tokens=False) if start < len(ids) else done
        parts.append(full[len(done) :] if full.startswith(done) else "")
        return "".join(parts)

    # ---------------------------------------------------------------------------------------------------------
    # Bytes behind the text (for incremental detokenization)

    @cached_property
    def _added_ids(self) -> dict[int, str]:
        # added token id -> its text
        return {i: token.content for i, token in self.backend.get_added_tokens_decoder().items()}

    @cached_property
    def byte_decoding(self) -> str | None:
        """BYTE_LEVEL, BYTE_FALLBACK or None: whether decoding joins bytes of several tokens into characters."""
        decoder = json.loads(self.backend.to_str()).get("decoder")
        types: set[str] = set()
        stack = [decoder]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                types.add(str(node.get("type")))
                stack.extend(node.get("decoders") or [])
        if "ByteLevel" in types:
            return BYTE_LEVEL
        if "ByteFallback" in types:
            return BYTE_FALLBACK
        return None

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes a token stands for where byte_decoding joins bytes across tokens, else None (an added
        token, or a whole-text token of a byte-fallback vocabulary: it ends any partial character)."""
        cache = self._token_bytes
        if token_id in cache:
            return cache[token_id]
        value: bytes | None = None
        token = self.backend.id_to_token(token_id)
        if token is not None and token_id not in self._added_ids:
            if self.byte_decoding == BYTE_LEVEL:
                if all(c in _BYTE_LEVEL_DECODE for c in token):
                    value = bytes(_BYTE_LEVEL_DECODE[c] for c in token)
            elif self.byte_decoding == BYTE_FALLBACK:
                match = _BYTE_FALLBACK_TOKEN.fullmatch(token)
                if match is not None:
                    value = bytes([int(match.group(1), 16)])
        cache[token_id] = value
        return value

    @cached_property
    def _token_bytes(self) -> dict[int, bytes | None]:
        # token id -> token_bytes(token id), filled as tokens are met
        return {}

    # ---------------------------------------------------------------------------------------------------------
    # Chat template

    @property
    def chat_template(self) -> str | None:
        """The default chat template (jinja source), or None when the model has none."""
        return self.chat_templates.get("default")

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        """Render a conversation to the prompt text the model was trained on (not tokenized).

        `chat_template` overrides the model's: a jinja source, or the name of one of the model's templates.
        `extra` becomes template variables (e.g. documents=..., enable_thinking=False).
        """
        template = self._select_chat_template(chat_template, tools)
        conversation = _validated_messages(messages)
        variables = {**self.special_tokens, **extra}
        # transformers passes documents=None, so `documents is defined` holds in templates.
        variables.setdefault("documents", None)
        try:
            return _compile_chat_template(template).render(
                messages=conversation, tools=tools, add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template failed to render the messages: {e}") from e

    def _select_chat_template(self, chat_template: str | None, tools: list[dict[str, Any]] | None) -> str:
        if chat_template is not None:
            return self.chat_templates.get(chat_template, chat_template)
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" in self.chat_templates:
            return self.chat_templates["default"]
        if self.chat_templates:
            names = ", ".join(sorted(self.chat_templates))
            raise ValueError(
                f"this model has several chat templates ({names}) and no default: pass chat_template="
            )
        raise ValueError(
            "this model has no chat template (no chat_template in tokenizer_config.json, no chat_template.jinja): "
            "pass chat_template= with a jinja template, or send plain prompts instead of chat messages."
        )


def check_valid_text(text: str, field: str = "text") -> None:
    """Raise InvalidTextError if `text` holds a lone surrogate (it has no UTF-8 encoding, so no tokens)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidTextError(
            f"{field} contains a lone surrogate {text[e.start]!r} at position {e.start}, which is not valid "
            "Unicode: send valid UTF-8 (or, in JSON, a surrogate pair such as \\ud83d\\ude00 for one character)"
        ) from None


# -------------------------------------------------------------------------------------------------------------
# Loading helpers


def _read_json_object(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore it from the model's release.") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}.")
    return data


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or a serialized AddedToken {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _add_missing_tokens(
    backend: BackendTokenizer,
    config: dict[str, Any],
    special_tokens: dict[str, str],
    extra_special_tokens: tuple[str, ...],
) -> None:
    """Add the tokens tokenizer_config.json declares but tokenizer.json does not, as transformers does on load."""
    added = {token.content for token in backend.get_added_tokens_decoder().values()}
    decoder = config.get("added_tokens_decoder") or {}
    new_tokens = []
    for _, entry in sorted(decoder.items(), key=lambda item: int(item[0])):
        if isinstance(entry, dict) and entry.get("content") not in added:
            new_tokens.append(
                AddedToken(
                    entry["content"],
                    single_word=entry.get("single_word", False),
                    lstrip=entry.get("lstrip", False),
                    rstrip=entry.get("rstrip", False),
                    normalized=entry.get("normalized", not entry.get("special", False)),
                    special=entry.get("special", False),
                )
            )
            added.add(entry["content"])
    for content in (*special_tokens.values(), *extra_special_tokens):
        if content not in added:
            new_tokens.append(AddedToken(content, special=True, normalized=False))
            added.add(content)
    if new_tokens:
        backend.add_tokens(new_tokens)


def _chat_templates(value: Any, tokenizer_config: Path) -> dict[str, str]:
    """tokenizer_config.json's chat_template: one template, or a list of {"name", "template"}."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(
        isinstance(t, dict) and "name" in t and "template" in t for t in value
    ):
        return {t["name"]: t["template"] for t in value}
    raise ValueError(
        f"{tokenizer_config}: chat_template must be a string or a list of {{'name', 'template'}} objects."
    )


def _clean_up_tokenization(text: str) -> str:
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


# -------------------------------------------------------------------------------------------------------------
# Chat template rendering


def _validated_messages(messages: Any) -> list[dict[str, Any]]:
    """Check the conversation's shape and drop None-valued keys (OpenAI clients send content=None with
    tool_calls; templates expect the key to be absent), as transformers does."""
    if not isinstance(messages, list | tuple):
        raise ValueError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}"
        )
    if not messages:
        raise ValueError("messages is empty: a conversation needs at least one message")
    conversation = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(
                f"messages[{index}] must be a dict with 'role' and 'content', got {type(message).__name__}"
            )
        if not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{index}] has no 'role' string (e.g. 'user', 'assistant', 'system')")
        if "content" not in message and "tool_calls" not in message:
            raise ValueError(f"messages[{index}] has no 'content'")
        conversation.append({key: value for key, value in message.items() if value is not None})
    return conversation


class _GenerationTagExtension(jinja2.ext.Extension):
    """Accept transformers' {% generation %}...{% endgeneration %} tag (marks assistant text for training
    masks); here it renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson escapes HTML characters (<, >, &), which would change the prompt text.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=16)
def _compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in an environment configured like transformers' (sandboxed: templates come
    from model files and are untrusted)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTagExtension, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template is not valid jinja (line {e.lineno}): {e.message}") from e
