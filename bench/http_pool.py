"""CPU per streaming HTTP request against the number of connections in the client's pool.

    .venv/bin/python bench/http_pool.py [--requests 300]

Why calls are spread over pools of a few calls each (realtime/providers/http.py): the
connection pool of httpcore (under httpx, which the ElevenLabs SDK uses) and of httpcore2
(under httpx2, the OpenAI SDK's) walks its connections when a request starts and again
when its response closes, polling each idle socket - and httpcore 1.0 also compares every
idle connection with all the others. A realtime process with one pool for all its calls
holds a connection per concurrent stream: a hundred at 100 calls.

A small HTTP/1.1 server in this process answers every request with two bytes, keeping the
connection. For each pool size N, N concurrent requests fill the pool, then ``--requests``
requests one after another are timed (process CPU, client and server). Last line:
``httpx_1_us=.. httpx_100_us=.. httpx2_1_us=.. httpx2_100_us=..`` (and the other sizes).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from realtime.providers.http import streaming_http_client

SIZES = (1, 8, 25, 100)
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    pending = b""
    while data := await reader.read(65536):
        pending += data
        while b"\r\n\r\n" in pending:  # requests without a body
            _, pending = pending.split(b"\r\n\r\n", 1)
            writer.write(ANSWER)
    writer.close()


async def cpu_per_request(client: Any, url: str, pooled: int, requests: int) -> float:
    async def held() -> None:
        async with client.stream("GET", url) as response:
            await asyncio.sleep(0.05)  # all of them open at once: one connection each
            await response.aread()

    await asyncio.gather(*(held() for _ in range(pooled)))
    started = time.process_time()
    for _ in range(requests):
        async with client.stream("GET", url) as response:
            async for _ in response.aiter_bytes():
                pass
    return (time.process_time() - started) / requests


async def main(requests: int) -> None:
    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    clients: dict[str, Callable[[], Any]] = {
        "httpx": streaming_http_client,
        "httpx2": openai.DefaultAsyncHttpxClient,
    }
    figures: dict[str, float] = {}
    for name, make in clients.items():
        for pooled in SIZES:
            client = make()
            try:
                spent = await cpu_per_request(client, url, pooled, requests)
            finally:
                await client.aclose()
            figures[f"{name}_{pooled}_us"] = spent * 1e6
            print(f"{name}, {pooled:3d} connections pooled: {spent * 1e6:7.0f} us of CPU a request")
    server.close()
    print(" ".join(f"{key}={value:.0f}" for key, value in figures.items()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    uvloop.run(main(parser.parse_args().requests))
