"""The router's lean HTTP/1.1 client (tokenmill/router/upstream.py) against real sockets: keep-alive reuse,
sized and chunked bodies, streaming, and the failures failover relies on, each as httpx's exception type."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from tokenmill.router.upstream import UpstreamPool


class Backend:
    """A raw HTTP/1.1 server on 127.0.0.1: each connection answers requests with `answer(request_bytes)`."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def __aenter__(self) -> Backend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                keep = await self.answer(request, writer)
                await writer.drain()
                if not keep:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


def sized(body: bytes, status: int = 200, extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
            .encode() + body)


def run(coro):
    return asyncio.run(coro)


def test_post_reuses_the_connection_and_sends_headers_and_body():
    async def answer(request, writer):
        writer.write(sized(b'{"ok": 1}', extra="Retry-After: 3\r\nX-A: 1\r\nX-A: 2\r\n"))
        return True

    async def main():
        async with Backend(answer) as backend:
            pool = UpstreamPool(5.0, 5.0, keepalive_expiry=4.0)
            for i in range(3):
                response = await pool.post("127.0.0.1", backend.port, "/v1/completions", b'{"n": %d}' % i,
                                           {"X-Request-Id": f"r{i}", "Content-Type": "application/json"})
                assert response.status_code == 200
                assert response.headers["retry-after"] == "3"
                assert response.headers["x-a"] == "1, 2"
                assert await response.aread() == b'{"ok": 1}'
                assert response.is_closed
            pool.close()
            assert backend.connections == 1
            assert len(backend.requests) == 3
            head, body = backend.requests[2].split(b"\r\n\r\n")
            assert body == b'{"n": 2}'
            assert head.startswith(b"POST /v1/completions HTTP/1.1\r\n")
            assert b"\r\nX-Request-Id: r2" in head and b"\r\nContent-Length: 8" in head

    run(main())


def test_chunked_stream_arrives_chunk_by_chunk():
    release = asyncio.Event()

    async def answer(request, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"d\r\ndata: first\n\n\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"e\r\ndata: second\n\n\r\n0\r\n\r\n")
        return True

    async def main():
        async with Backend(answer) as backend:
            pool = UpstreamPool(5.0, 5.0, keepalive_expiry=4.0)
            response = await pool.post("127.0.0.1", backend.port, "/v1/completions", b"{}", {})
            assert response.headers["content-type"] == "text/event-stream"
            chunks = response.aiter_bytes()
            assert await chunks.__anext__() == b"data: first\n\n"  # before the rest is even written
            release.set()
            rest = b"".join([chunk async for chunk in chunks])
            assert rest == b"data: second\n\n"
            assert response.is_closed
            # The connection went back to the pool: a second request reuses it.
            release.set()
            response = await pool.post("127.0.0.1", backend.port, "/v1/completions", b"{}", {})
            await response.aread()
            assert backend.connections == 1
            pool.close()

    run(main())


def test_connect_refused_is_a_connect_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there

    async def main():
        with pytest.raises(httpx.ConnectError):
            await UpstreamPool(5.0, 5.0, keepalive_expiry=4.0).post("127.0.0.1", port, "/", b"{}", {})

    run(main())


def test_no_answer_in_time_is_a_read_timeout():
    async def answer(request, writer):
        await asyncio.sleep(5)
        return False

    async def main():
        async with Backend(answer) as backend:
            with pytest.raises(httpx.ReadTimeout):
                await UpstreamPool(5.0, 0.2, keepalive_expiry=4.0).post("127.0.0.1", backend.port, "/", b"{}", {})

    run(main())


def test_a_stream_that_stalls_times_out_and_one_cut_short_is_a_protocol_error():
    async def stall(request, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(5)
        return False

    async def cut(request, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        return False  # closes the connection

    async def main():
        async with Backend(stall) as backend:
            response = await UpstreamPool(5.0, 0.3, keepalive_expiry=4.0).post(
                "127.0.0.1", backend.port, "/", b"{}", {})
            chunks = response.aiter_bytes()
            assert await chunks.__anext__() == b"hello"
            with pytest.raises(httpx.ReadTimeout):
                await chunks.__anext__()
        async with Backend(cut) as backend:
            response = await UpstreamPool(5.0, 5.0, keepalive_expiry=4.0).post(
                "127.0.0.1", backend.port, "/", b"{}", {})
            with pytest.raises(httpx.RemoteProtocolError):
                await response.aread()

    run(main())


def test_a_kept_alive_connection_the_backend_closed_is_replaced():
    async def answer_once(request, writer):
        writer.write(sized(b"{}"))
        return False  # answers, then closes the connection (as a backend's idle timeout would)

    async def main():
        async with Backend(answer_once) as backend:
            pool = UpstreamPool(5.0, 5.0, keepalive_expiry=4.0)
            for _ in range(3):
                response = await pool.post("127.0.0.1", backend.port, "/", b"{}", {})
                assert response.status_code == 200
                await response.aread()
                await asyncio.sleep(0.05)
            assert backend.connections == 3 and len(backend.requests) == 3
            pool.close()

    run(main())


def test_an_answer_left_unread_closes_its_connection():
    async def answer(request, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.5)
        writer.write(b"0\r\n\r\n")
        return True

    async def main():
        async with Backend(answer) as backend:
            pool = UpstreamPool(5.0, 5.0, keepalive_expiry=4.0)
            response = await pool.post("127.0.0.1", backend.port, "/", b"{}", {})
            await response.aclose()  # a client that went away mid-stream
            response = await pool.post("127.0.0.1", backend.port, "/", b"{}", {})
            assert await response.aread() == b"hello"
            assert backend.connections == 2
            pool.close()

    run(main())


def test_a_body_without_a_length_ends_with_the_connection():
    async def answer(request, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"a\": 1}")
        return False  # the end of the body is the end of the connection

    async def main():
        async with Backend(answer) as backend:
            pool = UpstreamPool(5.0, 5.0, keepalive_expiry=4.0)
            response = await pool.post("127.0.0.1", backend.port, "/", b"{}", {})
            assert await response.aread() == b'{"a": 1}'
            response = await pool.post("127.0.0.1", backend.port, "/", b"{}", {})  # on a new connection
            assert await response.aread() == b'{"a": 1}'
            assert backend.connections == 2

    run(main())
