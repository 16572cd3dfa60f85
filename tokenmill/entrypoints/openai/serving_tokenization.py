"""POST /tokenize and /detokenize (vLLM's): the server's tokenizer and chat template, over HTTP."""

from __future__ import annotations

from tokenmill.entrypoints.openai.errors import bad_request
from tokenmill.entrypoints.openai.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from tokenmill.entrypoints.openai.serving_engine import OpenAIServing


class OpenAIServingTokenization(OpenAIServing):
    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        self.check_model(request.model)
        tokens = await self.in_thread(self._tokenize, request)
        return TokenizeResponse(count=len(tokens), max_model_len=self.max_model_len, tokens=tokens)

    def _tokenize(self, request: TokenizeRequest) -> list[int]:
        if isinstance(request, TokenizeChatRequest):
            text = self.render_chat(request.messages, request.add_generation_prompt, request.chat_template_kwargs)
            param = "messages"
        else:
            text, param = request.prompt, "prompt"
        return self.encode(text, request.add_special_tokens, param)

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(request.model)
        vocab_size = self.engine.engine.vocab_size
        bad = next((t for t in request.tokens if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary [0, {vocab_size})", param="tokens")
        text = await self.in_thread(self.tokenizer.decode, request.tokens, False)
        return DetokenizeResponse(prompt=text)
