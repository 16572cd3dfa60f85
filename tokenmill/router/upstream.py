"""A lean HTTP/1.1 client for forwarding requests to plain-HTTP backends (local replicas).

Each routed request pays for one upstream request on top of the router's own work, and with httpx that client
side alone costs about a millisecond of CPU per request (httpx, httpcore, h11 and anyio layers), half of what
the router adds. This client does only what forwarding needs: POST a body on a kept-alive connection, parse the
answer with httptools (the parser uvicorn uses), hand the body over whole or chunk by chunk. It raises httpx's
exception types (ConnectError, ConnectTimeout, ReadTimeout, RemoteProtocolError), so failover treats both
clients alike. HTTPS backends and backends reached through a proxy from the environment keep using httpx.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator

import httptools
import httpx

# A streamed answer stops being read from the socket while this much is waiting for the client.
MAX_BUFFERED = 256 * 1024


class _Connection(asyncio.Protocol):
    """One connection to a backend and the answer to the request on it."""

    def __init__(self, key: tuple[str, int]) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: dict[str, str] = {}
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.received_any = False
        self.error: Exception | None = None
        self.chunks: deque[bytes] = deque()
        self.num_buffered = 0
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False

    # ---- asyncio.Protocol -------------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio classes

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(httpx.RemoteProtocolError(f"invalid HTTP answer from the backend: {e}"))
            if self.transport is not None:
                self.transport.close()
            return
        if self.num_buffered > MAX_BUFFERED and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if (exc is None and self.headers_done and not self.complete and "content-length" not in self.headers
                and "transfer-encoding" not in self.headers):
            self.complete = True  # a body without a length ends with the connection (not kept alive)
            self._wake()
        if not self.complete:
            self._fail(httpx.RemoteProtocolError(
                "the backend closed the connection before the answer was complete" + (f" ({exc})" if exc else "")))

    # ---- httptools callbacks ----------------------------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.num_buffered += len(body)
        self._wake()

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()  # (the parser forgets it once the message is done)
        self.complete = True
        self._wake()

    # ---- the request side -------------------------------------------------------------------------------------------
    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self, timeout: float | None) -> None:
        """Until the parser has more for the reader (or the connection failed)."""
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        timer = loop.call_later(timeout, self._timed_out, self.waiter) if timeout is not None else None
        try:
            await self.waiter
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()

    @staticmethod
    def _timed_out(waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(httpx.ReadTimeout("no answer from the backend in time"))

    def take(self) -> bytes:
        data = b"".join(self.chunks) if len(self.chunks) != 1 else self.chunks[0]
        self.chunks.clear()
        self.num_buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and self.error is None and not self.lost


class UpstreamResponse:
    """The answer to one forwarded request: status and headers at once, the body whole or in chunks."""

    def __init__(self, pool: UpstreamPool, conn: _Connection, read_timeout: float | None) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self._read_timeout = read_timeout
        self.status_code = conn.status
        self.headers = conn.headers
        self.is_closed = False

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while conn is not None:
            if conn.chunks:
                yield conn.take()
                continue
            if conn.complete:
                break
            if conn.error is not None:
                raise conn.error
            await conn.wait(self._read_timeout)
        await self.aclose()

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_bytes()])

    async def aclose(self) -> None:
        if self.is_closed:
            return
        self.is_closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool.release(conn)


class UpstreamPool:
    """Kept-alive connections to plain-HTTP backends, per host and port."""

    def __init__(self, connect_timeout: float | None, read_timeout: float | None, keepalive_expiry: float,
                 max_idle_per_host: int = 64) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive_expiry = keepalive_expiry
        self.max_idle_per_host = max_idle_per_host
        self._idle: dict[tuple[str, int], list[_Connection]] = {}

    async def _connect(self, key: tuple[str, int]) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(key), key[0], key[1]), self.connect_timeout)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {key[0]}:{key[1]} timed out") from None
        except OSError as e:
            raise httpx.ConnectError(f"cannot connect to {key[0]}:{key[1]}: {e}") from None
        return conn

    def _take_idle(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.lost and now - conn.idle_since < self.keepalive_expiry:
                return conn
            if conn.transport is not None:
                conn.transport.close()
        return None

    def release(self, conn: _Connection) -> None:
        if conn.reusable():
            idle = self._idle.setdefault(conn.key, [])
            if len(idle) < self.max_idle_per_host:
                conn._reset()
                conn.idle_since = time.monotonic()
                idle.append(conn)
                return
        if conn.transport is not None:
            conn.transport.close()

    async def post(self, host: str, port: int, target: str, body: bytes,
                   headers: dict[str, str]) -> UpstreamResponse:
        """POST body to http://host:port/target; the answer once its status line and headers are in."""
        key = (host, port)
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        head = [f"POST {target} HTTP/1.1\r\nHost: {authority}\r\nContent-Length: {len(body)}\r\n"]
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise httpx.LocalProtocolError(f"header {name!r} has a line break: it cannot be sent")
            head.append(f"{name}: {value}\r\n")
        head.append("\r\n")
        data = "".join(head).encode("latin-1") + body
        conn = self._take_idle(key)
        reused = conn is not None
        while True:
            if conn is None:
                conn = await self._connect(key)
            transport = conn.transport
            assert transport is not None
            transport.write(data)
            try:
                while not conn.headers_done:
                    if conn.error is not None:
                        raise conn.error
                    await conn.wait(self.read_timeout)
            except httpx.RemoteProtocolError:
                transport.close()
                if reused and not conn.received_any:
                    # The backend closed a kept-alive connection without reading the request: send it on a new one.
                    conn, reused = None, False
                    continue
                raise
            except BaseException:
                transport.close()
                raise
            return UpstreamResponse(self, conn, self.read_timeout)

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                if conn.transport is not None:
                    conn.transport.close()
        self._idle.clear()

