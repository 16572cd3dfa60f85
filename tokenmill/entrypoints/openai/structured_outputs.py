"""A request's structured-output fields (OpenAI's response_format, vLLM's structured_outputs, the older
guided_* extras) turned into one StructuredOutputsParams, or a 400 naming the parameter at fault."""

from __future__ import annotations

from typing import Any

from tokenmill.entrypoints.openai.errors import bad_request
from tokenmill.structured_output.params import StructuredOutputError, StructuredOutputsParams

# guided_* extra -> the StructuredOutputsParams field it sets.
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
_STRUCTURED_OUTPUTS_FIELDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag",
                              "disable_any_whitespace",
                              "max_whitespace", "backend")


def structured_outputs_params(request: Any) -> StructuredOutputsParams | None:
    """The request's constraint, None when it has none. Raises a 400 OpenAIError naming the parameter when the
    fields are malformed, invalid (a bad schema or regex, an empty choice list) or more than one is given."""
    sources: list[tuple[str, dict[str, Any]]] = []
    response_format = getattr(request, "response_format", None)
    if response_format is not None:
        fields = _response_format_fields(response_format)
        if fields is not None:
            sources.append(("response_format", fields))
    structured = getattr(request, "structured_outputs", None)
    if structured is not None:
        unknown = sorted(set(structured) - set(_STRUCTURED_OUTPUTS_FIELDS))
        if unknown:
            raise bad_request(
                f"structured_outputs has unknown field(s) {', '.join(unknown)}: use "
                f"{', '.join(_STRUCTURED_OUTPUTS_FIELDS)}", param="structured_outputs",
            )
        sources.append(("structured_outputs", dict(structured)))
    for name, field in _GUIDED.items():
        value = getattr(request, name, None)
        if value is not None:
            sources.append((name, {field: value}))
    if not sources:
        return None
    if len(sources) > 1:
        names = ", ".join(name for name, _ in sources)
        raise bad_request(f"{names} each constrain the output: give only one of them", param=sources[1][0])
    param, fields = sources[0]
    try:
        return StructuredOutputsParams(**fields)
    except StructuredOutputError as e:
        raise bad_request(_rename(str(e), param), param=param) from None
    except TypeError as e:  # a field of the wrong shape for the dataclass
        raise bad_request(f"{param} is malformed: {e}", param=param) from None


def _response_format_fields(value: dict[str, Any]) -> dict[str, Any] | None:
    kind = value.get("type")
    if kind == "text":
        _only_keys(value, {"type"}, "response_format")
        return None
    if kind == "json_object":
        _only_keys(value, {"type"}, "response_format")
        return {"json_object": True}
    if kind == "json_schema":
        _only_keys(value, {"type", "json_schema"}, "response_format")
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request("response_format.json_schema must be an object with name and schema",
                              param="response_format.json_schema")
        _only_keys(spec, {"name", "schema", "strict", "description"}, "response_format.json_schema")
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise bad_request("response_format.json_schema.name must be a non-empty string",
                              param="response_format.json_schema.name")
        if spec.get("strict") not in (None, True, False):
            raise bad_request("response_format.json_schema.strict must be a boolean",
                              param="response_format.json_schema.strict")
        schema = spec.get("schema")
        if schema is None:
            # OpenAI treats a missing schema as any JSON object.
            return {"json_object": True}
        return {"json": schema}
    raise bad_request(
        f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
        param="response_format.type",
    )


def _only_keys(value: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise bad_request(f"{where} has unknown field(s) {', '.join(unknown)}: allowed are {', '.join(sorted(allowed))}",
                          param=where)


def _rename(message: str, param: str) -> str:
    """Messages name StructuredOutputsParams' fields; say which request parameter they came from."""
    if param == "structured_outputs":
        return message
    if param == "response_format":
        return message.replace("structured_outputs.json", "response_format.json_schema.schema").replace(
            "structured_outputs", "response_format")
    return message.replace(f"structured_outputs.{_GUIDED[param]}", param).replace("structured_outputs", param)


__all__ = ["structured_outputs_params"]
