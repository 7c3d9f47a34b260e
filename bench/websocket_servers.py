"""CPU per websocket message of three Python websocket servers, with Twilio's traffic.

    .venv/bin/python bench/websocket_servers.py [--connections 100] [--messages 30000]

Each server runs in a process of its own on uvloop and echoes a 40 ms agent frame
(~460 bytes of JSON) for every second message it receives, as the realtime server does
while it speaks; ``--connections`` clients in this process each send a Twilio media
message (~390 bytes) every 20 ms. The server measures its own CPU time (process time)
from its first message to its last, divided by the messages it received. Servers:
uvicorn with websockets' sans-I/O protocol (what ``serve realtime`` runs), aiohttp, and
websockets' own asyncio server. Last line: ``uvicorn_us=.. aiohttp_us=.. websockets_us=..``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from typing import Any

import uvloop
from fastapi import FastAPI, WebSocket  # at module level: FastAPI resolves the annotation
from websockets.asyncio.client import connect

INBOUND = (
    '{"event":"media","sequenceNumber":"4","media":{"track":"inbound","chunk":"3",'
    '"timestamp":"60","payload":"' + "A" * 216 + '"},"streamSid":"MZ18ad3ab5a668481c"}'
)
OUTBOUND = '{"event":"media","streamSid":"MZ1","media":{"payload":"' + "A" * 428 + '"}}'
SERVERS = ("uvicorn", "aiohttp", "websockets")


class Meter:
    """Counts messages; at the last one, prints the CPU per message and ends the process."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.count = 0
        self.started: float | None = None

    def received(self) -> bool:
        """True when the server should answer this message with a frame."""
        if self.started is None:
            self.started = time.process_time()
        self.count += 1
        if self.count >= self.total:
            spent = time.process_time() - self.started
            print(f"{spent / self.count * 1e6:.1f}", flush=True)
            os._exit(0)
        return self.count % 2 == 0


def serve(kind: str, port: int, total: int) -> None:
    meter = Meter(total)
    if kind == "uvicorn":
        import uvicorn

        app = FastAPI()

        @app.websocket("/m")
        async def media(ws: WebSocket) -> None:
            await ws.accept()
            while True:
                await ws.receive()
                if meter.received():
                    await ws.send_text(OUTBOUND)

        uvicorn.run(app, port=port, log_level="warning", ws="websockets-sansio", loop="uvloop")
    elif kind == "aiohttp":
        from aiohttp import web

        async def handler(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for _ in ws:
                if meter.received():
                    await ws.send_str(OUTBOUND)
            return ws

        server = web.Application()
        server.router.add_get("/m", handler)
        web.run_app(server, port=port, print=None, loop=uvloop.new_event_loop())
    else:
        from websockets.asyncio.server import ServerConnection
        from websockets.asyncio.server import serve as ws_serve

        async def echo(ws: ServerConnection) -> None:
            async for _ in ws:
                if meter.received():
                    await ws.send(OUTBOUND)

        async def main() -> None:
            async with ws_serve(echo, "127.0.0.1", port, compression=None):
                await asyncio.Future()

        uvloop.run(main())


async def phones(port: int, connections: int, total: int) -> None:
    async def phone(index: int) -> None:
        async with connect(f"ws://127.0.0.1:{port}/m", compression=None) as ws:
            draining = asyncio.create_task(_drain(ws))
            await asyncio.sleep(index * 0.02 / connections)
            started = time.monotonic()
            for i in range(total // connections + 50):
                await ws.send(INBOUND)
                await asyncio.sleep(max(0.0, started + (i + 1) * 0.02 - time.monotonic()))
            draining.cancel()

    await asyncio.gather(*(phone(i) for i in range(connections)), return_exceptions=True)


async def _drain(ws: Any) -> None:
    async for _ in ws:
        pass


async def wait_listening(port: int) -> None:
    for _ in range(300):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
    raise RuntimeError("the server did not start")


def run(kind: str, connections: int, total: int, port: int) -> float:
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", kind, "--port", str(port), "--messages", str(total)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        uvloop.run(wait_listening(port))
        uvloop.run(phones(port, connections, total))
        out, _ = server.communicate(timeout=60)
    finally:
        server.kill()
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--messages", type=int, default=30000)
    parser.add_argument("--port", type=int, default=18765)
    parser.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.messages)
        return
    figures = {}
    for kind in SERVERS:
        figures[kind] = run(kind, args.connections, args.messages, args.port)
        print(f"{kind}: {figures[kind]:.1f} us of CPU per message received", flush=True)
    print(" ".join(f"{kind}_us={us:.1f}" for kind, us in figures.items()))


if __name__ == "__main__":
    main()
