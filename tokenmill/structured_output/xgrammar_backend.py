"""The xgrammar backend: grammars compiled ahead into per-state token-mask caches, so filling a mask costs
microseconds per sequence. JSON schema, regex, EBNF and Lark grammars.

xgrammar accepts a few JSON-schema keywords without enforcing them (it compiles `uniqueItems` and `not` but
generates output that ignores them). A schema using one is refused here (unsupported_reason), and the "auto"
backend sends it to llguidance, which enforces them or rejects them with a clear error.
"""

from __future__ import annotations

import json
import threading
import time
from typing import TYPE_CHECKING, Any

import torch

from tokenmill.structured_output.backend import CompiledGrammar, GrammarBackend, GrammarMatcher
from tokenmill.structured_output.params import StructuredOutputError, StructuredOutputsParams, map_subschemas

if TYPE_CHECKING:
    import xgrammar

    from tokenmill.model.tokenizer import Tokenizer

# Keywords xgrammar 0.2 compiles but does not enforce (checked by generating violating instances).
_UNENFORCED_KEYWORDS = frozenset(
    {"uniqueItems", "not", "if", "then", "else", "dependentRequired", "dependentSchemas", "minContains",
     "maxContains", "dependencies"}
)
# xgrammar's own worker threads for one compile (it parallelises building a grammar's mask cache).
_COMPILE_THREADS = 2


def unenforced_keywords(schema: Any) -> list[str]:
    """The keywords in a JSON schema (at any depth) that xgrammar would not enforce, sorted."""
    found: set[str] = set()

    def visit(node: dict[str, Any]) -> dict[str, Any]:
        found.update(key for key in node if key in _UNENFORCED_KEYWORDS)
        if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
            found.add("allOf")  # xgrammar enforces a single-entry allOf only
        return node

    map_subschemas(schema, visit)
    return sorted(found)


class XGrammarBackend(GrammarBackend):
    name = "xgrammar"

    def __init__(self, tokenizer: Tokenizer, vocab_size: int | None = None):
        super().__init__(tokenizer, vocab_size)
        self._lock = threading.Lock()
        self._compiler: xgrammar.GrammarCompiler | None = None

    def tokenizer_info(self) -> xgrammar.TokenizerInfo:
        """xgrammar's view of the vocabulary, built from tokenizer.json (no transformers tokenizer needed)."""
        import xgrammar

        backend = self.tokenizer.backend
        # The tokens as stored in tokenizer.json (byte-level "Ġ" forms); xgrammar decodes them itself.
        encoded_vocab = [""] * self.vocab_size
        for token, token_id in backend.get_vocab(with_added_tokens=True).items():
            if token_id < self.vocab_size:
                encoded_vocab[token_id] = token
        # An empty entry marks a special token for xgrammar: never generated as text. Without this, a regex
        # like `.*` would allow "<|im_start|>", which decoding with skip_special_tokens then drops.
        for token_id in self.tokenizer.all_special_ids:
            if token_id < self.vocab_size:
                encoded_vocab[token_id] = ""
        metadata = xgrammar.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
        return xgrammar.TokenizerInfo(
            encoded_vocab,
            metadata["vocab_type"],
            vocab_size=self.vocab_size,
            stop_token_ids=sorted(self.stop_token_ids),
            add_prefix_space=metadata["add_prefix_space"],
        )

    def _get_compiler(self) -> xgrammar.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                import xgrammar

                # tokenmill caches compiled grammars itself (manager.py), by the normalised specification.
                self._compiler = xgrammar.GrammarCompiler(
                    self.tokenizer_info(), max_threads=_COMPILE_THREADS, cache_enabled=False
                )
            return self._compiler

    def unsupported_reason(self, params: StructuredOutputsParams) -> str | None:
        schemas = [params.schema] if params.schema is not None else []
        if params.structural_tag is not None:
            schemas = _structural_tag_schemas(json.loads(str(params.structural_tag)))
        for schema in schemas:
            keywords = unenforced_keywords(schema)
            if keywords:
                return (
                    f"the xgrammar backend does not enforce the JSON-schema keyword(s) {', '.join(keywords)}: "
                    "use backend 'guidance' or 'auto', or drop them from the schema"
                )
        return None

    def compile(self, params: StructuredOutputsParams) -> CompiledGrammar:
        reason = self.unsupported_reason(params)
        if reason is not None:
            raise StructuredOutputError(f"structured_outputs.json: {reason}")
        compiler = self._get_compiler()
        start = time.perf_counter()
        kind = params.kind
        try:
            if kind in ("json", "json_object"):
                handle = compiler.compile_grammar(_json_grammar(params))
            elif kind == "regex":
                handle = compiler.compile_regex(str(params.regex))
            elif kind == "choice":
                assert params.choice is not None
                ebnf = "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice)
                handle = compiler.compile_grammar(ebnf)
            elif kind == "structural_tag":
                handle = compiler.compile_grammar(_structural_tag_grammar(str(params.structural_tag)))
            else:
                handle = self._compile_grammar(compiler, str(params.grammar))
        except StructuredOutputError:
            raise
        except Exception as e:  # xgrammar raises RuntimeError / ValueError with its parser's message
            raise StructuredOutputError(
                f"structured_outputs.{kind}: the xgrammar backend rejects it: {_clean_message(e)}"
            ) from None
        return CompiledGrammar(self, params.spec_key(), handle, time.perf_counter() - start)

    @staticmethod
    def _compile_grammar(compiler: xgrammar.GrammarCompiler, grammar: str) -> xgrammar.CompiledGrammar:
        """EBNF first (`root ::= ...`), else Lark (`start: ...`)."""
        try:
            return compiler.compile_grammar(grammar)
        except Exception as ebnf_error:
            try:
                return compiler.compile_lark(grammar)
            except Exception as lark_error:
                raise StructuredOutputError(
                    "structured_outputs.grammar is neither a valid EBNF grammar "
                    f"({_clean_message(ebnf_error)}) nor a valid Lark grammar ({_clean_message(lark_error)})"
                ) from None

    def new_matcher(self, compiled: CompiledGrammar) -> GrammarMatcher:
        return XGrammarMatcher(compiled)


class XGrammarMatcher(GrammarMatcher):
    def __init__(self, compiled: CompiledGrammar):
        import xgrammar

        super().__init__(compiled)
        self._matcher = xgrammar.GrammarMatcher(compiled.handle)

    def _accept(self, token_id: int) -> bool:
        return bool(self._matcher.accept_token(token_id))

    def _fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def _rollback(self, num_tokens: int) -> None:
        self._matcher.rollback(num_tokens)

    def _reset(self) -> None:
        self._matcher.reset()

    def is_completed(self) -> bool:
        return bool(self._matcher.is_completed())


# The character classes xgrammar 0.2 writes for the characters of JSON strings: with minLength/maxLength, and
# without. Both let through the UTF-8 encodings of surrogates (U+D800-U+DFFF, not valid UTF-8: they decode to
# U+FFFD), and the first also raw control characters (U+0000-U+001F but CR/LF), which JSON forbids in strings.
_XGRAMMAR_STRING_CHARS = (r'[^\"\\\r\n]', r'[^\0-\x1f\"\\\r\n]')
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\\uD800-\uDFFF]'


def _json_grammar(params: StructuredOutputsParams) -> str:
    """The grammar (EBNF) of a JSON-schema or json_object request, with xgrammar's string characters fixed."""
    import xgrammar

    whitespace = params.json_whitespace
    grammar = xgrammar.Grammar.from_json_schema(
        json.dumps(params.closed_schema if params.kind == "json" else {"type": "object"}),
        any_whitespace=whitespace > 0,
        separators=(",", ":"),
        max_whitespace_cnt=whitespace or None,
        # xgrammar's strict mode would also empty free-form objects ({"type": "object"}); closed_schema closes
        # only the objects that list their properties.
        strict_mode=False,
    )
    text = str(grammar)
    for chars in _XGRAMMAR_STRING_CHARS:
        text = text.replace(chars, _JSON_STRING_CHAR)
    return text


def _structural_tag_schemas(node: Any) -> list[Any]:
    """The JSON schemas inside a structural tag (the json_schema of its json_schema formats)."""
    if isinstance(node, list):
        return [schema for item in node for schema in _structural_tag_schemas(item)]
    if not isinstance(node, dict):
        return []
    if node.get("type") == "json_schema" and "json_schema" in node:
        return [node["json_schema"]]
    return [schema for value in node.values() for schema in _structural_tag_schemas(value)]


def _structural_tag_grammar(structural_tag: str) -> str:
    """The grammar (EBNF) of a structural tag, with the JSON string characters fixed as in _json_grammar."""
    import xgrammar

    text = str(xgrammar.Grammar.from_structural_tag(structural_tag))
    for chars in _XGRAMMAR_STRING_CHARS:
        text = text.replace(chars, _JSON_STRING_CHAR)
    return text


def _clean_message(error: Exception) -> str:
    """xgrammar's C++ errors start with a "[hh:mm:ss] /path/file.cc:123: " prefix; keep the message."""
    message = str(error).strip()
    if message.startswith("[") and ": " in message:
        head, _, rest = message.partition(": ")
        if ".cc:" in head or ".h:" in head:
            message = rest
    return message.splitlines()[0] if message else type(error).__name__
