"""What a request's output must match: StructuredOutputsParams (vLLM's names), validated on construction.

Exactly one constraint is set per request: a JSON schema (`json`), any JSON object (`json_object`), a regular
expression (`regex`), one of a list of strings (`choice`), a grammar (`grammar`) or an xgrammar structural tag
(`structural_tag`: free text and tagged JSON sections, what tool calling compiles to). Validation here is the cheap,
synchronous part (types, JSON syntax, the schema against its metaschema, regex syntax, an empty choice list), so
a server can answer bad input with a 400 before the request reaches the engine. What only the backend can tell
(a keyword it does not support, regex syntax it lacks, a grammar that does not parse) is reported when the
grammar is compiled (StructuredOutputError from the compile future).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

# The grammar libraries a request can be compiled with; "auto" picks per request (see manager.py).
StructuredOutputsBackend = Literal["auto", "xgrammar", "guidance"]
BACKENDS: tuple[str, ...] = ("auto", "xgrammar", "guidance")

# Whitespace allowed between JSON tokens when disable_any_whitespace is False: enough for pretty-printed
# output, bounded so that a bounded schema always finishes (a model cannot emit whitespace forever).
DEFAULT_MAX_WHITESPACE = 4
_MAX_WHITESPACE_LIMIT = 64

_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


class StructuredOutputError(ValueError):
    """A structured-outputs specification that cannot be honoured: invalid, or unsupported by the backend.

    A ValueError, so callers that turn ValueErrors into 400s (the server's validation) need nothing special.
    """


class StructuredOutputCompileTimeout(StructuredOutputError):
    """The grammar for one request was not compiled within the compile timeout."""


@dataclass
class StructuredOutputsParams:
    # A JSON schema (dict or JSON text) the output must be an instance of.
    json: dict[str, Any] | str | None = None
    # A regular expression the whole output must match.
    regex: str | None = None
    # The output is exactly one of these strings.
    choice: list[str] | None = None
    # A context-free grammar: xgrammar's EBNF (GBNF-style `root ::= ...`) or llguidance's Lark (`start: ...`).
    grammar: str | None = None
    # Any JSON object (OpenAI's response_format {"type": "json_object"}).
    json_object: bool | None = None
    # An xgrammar structural tag ({"type": "structural_tag", "format": {...}}, as a dict or its JSON text):
    # tagged sections (begin string, JSON-schema content, end string) with triggers, separators and free text.
    # Tool calling builds these (tool_parsers/); only the xgrammar backend compiles them.
    structural_tag: dict[str, Any] | str | None = None
    # JSON output without whitespace between tokens (`{"a":1,"b":[2,3]}`). When False, up to max_whitespace
    # whitespace characters are allowed between tokens: never unbounded, so bounded schemas terminate.
    disable_any_whitespace: bool = False
    # The cap on whitespace between JSON tokens when disable_any_whitespace is False.
    max_whitespace: int = DEFAULT_MAX_WHITESPACE
    # The backend for this request: "auto" (the engine's choice), "xgrammar" or "guidance".
    backend: StructuredOutputsBackend = "auto"
    # The parsed schema when json is set (a str is parsed once, here).
    _schema: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.json_object is False:
            self.json_object = None
        kinds = [kind for kind in _KINDS if getattr(self, kind) is not None]
        if not kinds:
            raise StructuredOutputError(
                "structured_outputs sets no constraint: give one of json, regex, choice, grammar, "
                "structural_tag or json_object=True"
            )
        if len(kinds) > 1:
            raise StructuredOutputError(
                f"structured_outputs sets {', '.join(kinds)}: give exactly one of json, regex, choice, "
                "grammar, structural_tag or json_object"
            )
        if self.backend not in BACKENDS:
            raise StructuredOutputError(
                f"structured_outputs.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}"
            )
        if not isinstance(self.disable_any_whitespace, bool):
            raise StructuredOutputError(
                f"structured_outputs.disable_any_whitespace must be a bool, got {self.disable_any_whitespace!r}"
            )
        if (
            not isinstance(self.max_whitespace, int)
            or isinstance(self.max_whitespace, bool)
            or not 1 <= self.max_whitespace <= _MAX_WHITESPACE_LIMIT
        ):
            raise StructuredOutputError(
                f"structured_outputs.max_whitespace must be an integer in [1, {_MAX_WHITESPACE_LIMIT}], got "
                f"{self.max_whitespace!r} (set disable_any_whitespace=True for no whitespace at all)"
            )
        if self.json is not None:
            self._schema = _validated_schema(self.json)
        elif self.regex is not None:
            _validate_regex(self.regex)
        elif self.choice is not None:
            _validate_choice(self.choice)
        elif self.structural_tag is not None:
            self.structural_tag = _validated_structural_tag(self.structural_tag)
        elif self.grammar is not None:
            if not isinstance(self.grammar, str) or not self.grammar.strip():
                raise StructuredOutputError(
                    f"structured_outputs.grammar must be a non-empty grammar string, got {self.grammar!r}"
                )
        elif self.json_object is not True:
            raise StructuredOutputError(
                f"structured_outputs.json_object must be true or absent, got {self.json_object!r}"
            )

    @property
    def kind(self) -> str:
        """Which constraint is set: "json", "regex", "choice", "grammar", "json_object" or "structural_tag"."""
        return next(kind for kind in _KINDS if getattr(self, kind) is not None)

    @property
    def schema(self) -> dict[str, Any] | None:
        """The JSON schema as a dict (parsed from text if json was given as a str); None for other kinds."""
        return self._schema

    @property
    def closed_schema(self) -> dict[str, Any] | None:
        """The schema as compiled: objects that list properties admit no others, and arrays that list
        prefixItems no more items, unless the schema says otherwise (additionalProperties, items, ...).

        Every output still validates against the user's schema; this only keeps a model from inventing keys
        (which would make a bounded schema unbounded), as OpenAI's strict mode and vLLM's xgrammar do. Both
        backends compile this same schema.
        """
        return None if self._schema is None else close_schema(self._schema)

    @property
    def json_whitespace(self) -> int:
        """Whitespace characters allowed between JSON tokens: 0 for compact output."""
        return 0 if self.disable_any_whitespace else self.max_whitespace

    def spec_key(self) -> tuple[str, str, int]:
        """The normalised specification: equal for specifications that compile to the same grammar.

        A schema given as text or as a dict, with any spacing, gives one key; key order is kept because it is
        the order in which properties are generated.
        """
        if self._schema is not None:
            text = json.dumps(self._schema, separators=(",", ":"), ensure_ascii=False)
        elif self.choice is not None:
            text = json.dumps(self.choice, ensure_ascii=False)
        elif self.json_object:
            text = ""
        elif self.structural_tag is not None:
            text = str(self.structural_tag)
        else:
            text = self.regex if self.regex is not None else str(self.grammar)
        # Whitespace shapes only JSON grammars.
        whitespace = self.json_whitespace if self.kind in ("json", "json_object") else 0
        return (self.kind, text, whitespace)


# JSON-schema keywords whose value is one subschema / a list of subschemas / a name -> subschema map.
SUBSCHEMA_KEYWORDS = frozenset(
    {"items", "additionalItems", "additionalProperties", "contains", "not", "if", "then", "else",
     "propertyNames", "unevaluatedItems", "unevaluatedProperties"}
)
SUBSCHEMA_LIST_KEYWORDS = frozenset({"prefixItems", "anyOf", "oneOf", "allOf", "items"})
SUBSCHEMA_MAP_KEYWORDS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})


def map_subschemas(schema: Any, fn: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
    """A copy of schema with fn applied to every (sub)schema object, innermost first."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in SUBSCHEMA_MAP_KEYWORDS and isinstance(value, dict):
            out[key] = {name: map_subschemas(sub, fn) for name, sub in value.items()}
        elif key in SUBSCHEMA_LIST_KEYWORDS and isinstance(value, list):
            out[key] = [map_subschemas(sub, fn) for sub in value]
        elif key in SUBSCHEMA_KEYWORDS:
            out[key] = map_subschemas(value, fn)
        else:
            out[key] = value
    return fn(out)


def close_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """See StructuredOutputsParams.closed_schema."""

    def close(node: dict[str, Any]) -> dict[str, Any]:
        if "properties" in node and not {"additionalProperties", "patternProperties",
                                         "unevaluatedProperties"} & node.keys():
            node["additionalProperties"] = False
        if "prefixItems" in node and not {"items", "unevaluatedItems"} & node.keys():
            node["items"] = False
        return node

    return map_subschemas(schema, close)


def _validated_schema(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            schema = json.loads(value)
        except json.JSONDecodeError as e:
            raise StructuredOutputError(f"structured_outputs.json is not valid JSON: {e}") from None
    else:
        schema = value
    if isinstance(schema, bool):
        # JSON Schema allows true/false; true gives no structure and false admits nothing.
        raise StructuredOutputError(
            f"structured_outputs.json must be a JSON schema object, got {json.dumps(schema)}: use "
            "json_object=True for any JSON object"
        )
    if not isinstance(schema, dict):
        raise StructuredOutputError(
            f"structured_outputs.json must be a JSON schema object (a dict or its JSON text), got "
            f"{type(schema).__name__}"
        )
    try:
        json.dumps(schema)
    except (TypeError, ValueError) as e:
        raise StructuredOutputError(f"structured_outputs.json is not JSON-serialisable: {e}") from None

    import jsonschema  # imported here: only requests with a schema pay for it

    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(part) for part in e.absolute_path) or "(root)"
        raise StructuredOutputError(
            f"structured_outputs.json is not a valid JSON schema: at {where}: {e.message}"
        ) from None
    return schema


def _validated_structural_tag(value: Any) -> str:
    """The structural tag as compact JSON text; its format is checked by xgrammar when compiling."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise StructuredOutputError(f"structured_outputs.structural_tag is not valid JSON: {e}") from None
    if not isinstance(value, dict) or value.get("type") != "structural_tag" or not isinstance(
            value.get("format"), dict):
        raise StructuredOutputError(
            "structured_outputs.structural_tag must be an object {'type': 'structural_tag', 'format': {...}} "
            "(xgrammar's structural tag)"
        )
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise StructuredOutputError(f"structured_outputs.structural_tag is not JSON-serialisable: {e}") from None


def _validate_regex(regex: Any) -> None:
    if not isinstance(regex, str) or not regex:
        raise StructuredOutputError(f"structured_outputs.regex must be a non-empty string, got {regex!r}")
    # Python's syntax is close to the backends' (ECMAScript-like) for what both accept; the backend reports the
    # rest (lookarounds, backreferences) when compiling.
    try:
        re.compile(regex)
    except re.error as e:
        raise StructuredOutputError(f"structured_outputs.regex {regex!r} is not a valid regex: {e}") from None


def _validate_choice(choice: Any) -> None:
    if not isinstance(choice, list | tuple):
        raise StructuredOutputError(
            f"structured_outputs.choice must be a list of strings, got {type(choice).__name__}"
        )
    if not choice:
        raise StructuredOutputError("structured_outputs.choice is an empty list: give at least one string")
    for index, item in enumerate(choice):
        if not isinstance(item, str) or not item:
            raise StructuredOutputError(
                f"structured_outputs.choice[{index}] must be a non-empty string, got {item!r}"
            )
