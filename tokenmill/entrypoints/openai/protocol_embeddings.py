"""Pydantic models of POST /v1/embeddings (OpenAI's API, vectors pooled as vLLM pools decoder models)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from tokenmill.entrypoints.openai.protocol import RequestModel, ResponseModel, check_text


class EmbeddingRequest(RequestModel):
    model: str | None = Field(None, description="A served model name; omitted: the server's model.")
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="A string, a list of strings, a list of token ids, or a list of token-id lists "
                    "(at most --max-prompts-per-request inputs, 256 by default)."
    )
    encoding_format: Literal["float", "base64"] | None = Field(
        "float", description="float: lists of numbers; base64: little-endian float32 bytes, base64-encoded."
    )
    dimensions: Any = Field(None, description="Not supported: the vectors have the model's hidden size.")
    user: str | None = Field(None, description="An end-user id; accepted and not used.")

    @field_validator("dimensions")
    @classmethod
    def _dimensions(cls, value):
        if value is None:
            return value
        raise ValueError(
            "dimensions is not supported by tokenmill: embeddings have the model's hidden size and are not "
            "shortened (remove it, or truncate and re-normalize the vectors yourself)"
        )

    @field_validator("input", mode="before")
    @classmethod
    def _input_form(cls, value):
        def is_ids(v) -> bool:
            return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

        if isinstance(value, str) or is_ids(value) or (isinstance(value, list) and (
                all(isinstance(v, str) for v in value) or all(is_ids(v) for v in value))):
            return value
        raise ValueError("input must be a string, a list of strings, a list of token ids or a list of token-id "
                         f"lists (not a mix), got {str(value)[:100]}")

    @field_validator("input")
    @classmethod
    def _input(cls, value):
        if isinstance(value, str):
            if not value:
                raise ValueError("input must not be an empty string")
            return check_text(value, "input")
        if not value:
            raise ValueError("input must not be an empty list")
        # How many inputs one request may hold is the server's --max-prompts-per-request.
        if isinstance(value[0], str) and any(not s for s in value):
            raise ValueError("input must not contain empty strings")
        if isinstance(value[0], list) and any(not ids for ids in value):
            raise ValueError("input must not contain an empty token-id list")
        return check_text(value, "input")


class EmbeddingData(ResponseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    # A list of floats, or with encoding_format "base64" the float32 bytes base64-encoded.
    embedding: list[float] | str


class EmbeddingUsage(ResponseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(ResponseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage
