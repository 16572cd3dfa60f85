"""POST /v1/embeddings: one pooled, normalized vector per input, computed by prefill-only engine requests."""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator

import numpy as np

from tokenmill.entrypoints.openai.errors import bad_request
from tokenmill.entrypoints.openai.protocol_embeddings import (
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
)
from tokenmill.entrypoints.openai.serving_engine import (
    OpenAIServing,
    Prompt,
    RequestContext,
    engine_error,
    merge_outputs,
    unless_disconnected,
)
from tokenmill.outputs import EmbeddingRequestOutput
from tokenmill.pooling_params import PoolingParams


def encode_base64(embedding: list[float]) -> str:
    """OpenAI's base64 encoding: the vector's little-endian float32 bytes."""
    return base64.b64encode(np.asarray(embedding, dtype="<f4").tobytes()).decode("ascii")


class OpenAIServingEmbedding(OpenAIServing):
    async def create_embedding(self, request: EmbeddingRequest, ctx: RequestContext) -> EmbeddingResponse:
        model_name = self.check_model(request.model)
        feature = self.resolve_feature(None, ctx.feature_header)
        num_inputs = _num_inputs(request.input)
        self.check_num_prompts(num_inputs, 1, param="input")
        self.reserve_queue(ctx, num_inputs, param="input")
        prompts = await self.in_thread(self._prompts, request.input)
        num_tokens = sum(len(p.token_ids) for p in prompts)
        reservation = self.admit(ctx.api_key, feature, num_tokens)
        request_id = f"embd-{uuid.uuid4().hex}"
        params = PoolingParams()  # the engine's --pooling-type, normalized
        streams: list[AsyncIterator[EmbeddingRequestOutput]] = [
            self.pool(request_id if len(prompts) == 1 else f"{request_id}-{i}", p, params, ctx, feature)
            for i, p in enumerate(prompts)
        ]
        try:
            outputs = await unless_disconnected(ctx.raw_request, self._collect(streams))
        finally:
            self.limiter.settle(reservation, num_tokens)
        base64_format = request.encoding_format == "base64"
        data = [
            EmbeddingData(index=i, embedding=encode_base64(o.outputs.embedding) if base64_format
                          else o.outputs.embedding)
            for i, o in enumerate(outputs)
        ]
        return EmbeddingResponse(data=data, model=model_name,
                                 usage=EmbeddingUsage(prompt_tokens=num_tokens, total_tokens=num_tokens))

    @staticmethod
    async def _collect(streams) -> list[EmbeddingRequestOutput]:
        outputs: list[EmbeddingRequestOutput | None] = [None] * len(streams)
        try:
            async for index, output in merge_outputs(streams):
                outputs[index] = output  # type: ignore[call-overload]  # the streams are encode()'s
        except Exception as e:
            raise engine_error(e) from None
        assert all(o is not None and o.finished for o in outputs)
        return outputs  # type: ignore[return-value]

    def _prompts(self, value: str | list[str] | list[int] | list[list[int]]) -> list[Prompt]:
        """Call from a worker thread (in_thread)."""
        if isinstance(value, str) or isinstance(value[0], int):
            return [self._prompt(value, "input")]  # type: ignore[arg-type]
        return [self._prompt(v, f"input[{i}]") for i, v in enumerate(value)]  # type: ignore[arg-type]

    def _prompt(self, value: str | list[int], param: str) -> Prompt:
        token_ids = self.encode(value, param=param) if isinstance(value, str) else list(value)
        if len(token_ids) > self.max_model_len:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens, however {param} has "
                f"{len(token_ids)} tokens: shorten the input (or raise --max-model-len on the server)",
                param=param, code="context_length_exceeded",
            )
        prompt = self.token_prompt(token_ids, param)
        prompt.text = value if isinstance(value, str) else None
        return prompt


def _num_inputs(value: str | list[str] | list[int] | list[list[int]]) -> int:
    """Engine requests an input makes: one per string or token-id list."""
    return 1 if isinstance(value, str) or isinstance(value[0], int) else len(value)
