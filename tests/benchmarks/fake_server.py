"""A tiny OpenAI-compatible streaming server on loopback, for testing `bench serve` without a real engine.

Plain asyncio HTTP/1.1 in a background thread (one response per connection, closed after the body): GET
/v1/models, and POST /v1/completions and /v1/chat/completions streamed as server-sent events. Each request
gets max_tokens one-token chunks, the first after `ttft_s` and the others `itl_s` apart, then a usage chunk
and "data: [DONE]". A prompt containing "FAIL" is answered with HTTP 500.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time


class FakeOpenAIServer:
    def __init__(self, ttft_s: float = 0.01, itl_s: float = 0.002, model: str = "fake-model") -> None:
        self.ttft_s = ttft_s
        self.itl_s = itl_s
        self.model = model
        # Every POST body received, in arrival order.
        self.payloads: list[dict] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeOpenAIServer:
        started = threading.Event()

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
            self.port = self._server.sockets[0].getsockname()[1]
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("fake server did not start")
        return self

    def __exit__(self, *exc) -> None:
        async def stop() -> None:
            self._server.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = (await reader.readline()).decode()
            headers = {}
            while line := (await reader.readline()).decode().strip():
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", 0)))
            method, path, _ = request_line.split(" ", 2)
            if method == "GET" and path == "/v1/models":
                await self._send_json(
                    writer, 200, {"object": "list", "data": [{"id": self.model, "object": "model"}]}
                )
            elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
                await self._stream(writer, path, json.loads(body))
            else:
                await self._send_json(writer, 404, {"error": {"message": f"no route {method} {path}"}})
        finally:
            writer.close()

    async def _send_json(self, writer: asyncio.StreamWriter, status: int, data: dict) -> None:
        body = json.dumps(data).encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()

    async def _stream(self, writer: asyncio.StreamWriter, path: str, payload: dict) -> None:
        self.payloads.append(payload)
        chat = path.endswith("chat/completions")
        prompt = payload["messages"][-1]["content"] if chat else payload["prompt"]
        if "FAIL" in prompt:
            await self._send_json(writer, 500, {"error": {"message": "asked to fail"}})
            return
        self._in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
            num_tokens = int(payload["max_tokens"])
            created = int(time.time())

            def event(choices: list, usage: dict | None = None) -> bytes:
                chunk = {
                    "id": "cmpl-1",
                    "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": created,
                    "model": self.model,
                    "choices": choices,
                }
                if usage is not None:
                    chunk["usage"] = usage
                return f"data: {json.dumps(chunk)}\n\n".encode()

            if chat:  # a role-only first chunk, as OpenAI sends: carries no output
                writer.write(event([{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]))
            await asyncio.sleep(self.ttft_s)
            for i in range(num_tokens):
                if i:
                    await asyncio.sleep(self.itl_s)
                text = f" t{i}"
                finish = "length" if i == num_tokens - 1 else None
                choice = (
                    {"index": 0, "delta": {"content": text}, "finish_reason": finish}
                    if chat
                    else {"index": 0, "text": text, "finish_reason": finish}
                )
                writer.write(event([choice]))
                await writer.drain()
            if (payload.get("stream_options") or {}).get("include_usage"):
                writer.write(
                    event(
                        [],
                        {"prompt_tokens": 5, "completion_tokens": num_tokens, "total_tokens": 5 + num_tokens},
                    )
                )
            writer.write(b"data: [DONE]\n\n")
            await writer.drain()
        finally:
            self._in_flight -= 1
