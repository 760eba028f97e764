"""A light HTTP/1.1 load generator for the serving benchmark, in the spirit of wrk: asyncio keep-alive
connections in one thread, each request pre-encoded once, the response read by its Content-Length.

A load generator on the same cores as the service takes CPU from it; a Python HTTP client (httpx in
threads) spends about a millisecond of CPU per request, this one a small fraction of that, so the
figures measure the service rather than the client. Only what the benchmark needs: POST bodies, status
and latency; no redirects, no chunked responses, no TLS.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit


class Target:
    """Pre-encoded POST requests to one URL path, one per payload."""

    def __init__(self, url: str, path: str, payloads: list[bytes], content_type: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.requests = [
            (
                f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body
            for body in payloads
        ]

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.host, self.port)


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """Send one request and read its whole response; returns the status code."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
            break
    if length:
        await reader.readexactly(length)
    return status


def closed_loop(target: Target, clients: int, seconds: float) -> tuple[float, list[float]]:
    """Successful requests/s and their latencies, `clients` connections each sending one request after
    the other for `seconds`."""

    async def client(i: int, stop: float, latencies: list[float]) -> int:
        reader, writer = await target.connect()
        n = 0
        try:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                if await _exchange(reader, writer, target.requests[(i + n) % len(target.requests)]) == 200:
                    latencies.append(time.perf_counter() - t)
                n += 1
        finally:
            writer.close()
        return n

    async def run() -> tuple[float, list[float]]:
        latencies: list[float] = []
        start = time.perf_counter()
        await asyncio.gather(*(client(i, start + seconds, latencies) for i in range(clients)))
        return len(latencies) / (time.perf_counter() - start), latencies

    return asyncio.run(run())


def open_loop(target: Target, rate: float, seconds: float, until=None, connections: int = 64) -> list[float]:
    """Latencies of successful requests (from the scheduled send time) at a fixed arrival rate, for
    `seconds` or, with `until` (a threading.Event), until it is set."""

    async def run() -> list[float]:
        pool: asyncio.Queue = asyncio.Queue()
        for _ in range(connections):
            pool.put_nowait(await target.connect())
        latencies: list[float] = []

        async def send(i: int, due: float) -> None:
            reader, writer = await pool.get()
            request = target.requests[i % len(target.requests)]
            try:
                try:
                    status = await _exchange(reader, writer, request)
                except (asyncio.IncompleteReadError, ConnectionError):
                    # the server closed a connection left idle past its keep-alive timeout (at a low rate
                    # the pool's connections wait their turn long): a new one, as an HTTP client does
                    writer.close()
                    reader, writer = await target.connect()
                    status = await _exchange(reader, writer, request)
                if status == 200:
                    latencies.append(time.perf_counter() - due)
            finally:
                pool.put_nowait((reader, writer))

        tasks = []
        start, i = time.perf_counter(), 0
        while (until is None and i < int(rate * seconds)) or (until is not None and not until.is_set()):
            due = start + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(send(i, due)))
            i += 1
        await asyncio.gather(*tasks)
        while not pool.empty():
            pool.get_nowait()[1].close()
        return latencies

    return asyncio.run(run())
