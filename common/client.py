"""A small blocking client of the wire protocol (PROTOCOL.md v1), for tests and tools.

    python -m llmctl.common.client --host 127.0.0.1 --port 8080 "Once upon a time"
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator

from llmctl.common import protocol as p
from llmctl.common.protocol import Frame, FrameDecoder, FrameType


class ServerError(Exception):
    def __init__(self, stream: int, body: dict[str, Any]) -> None:
        super().__init__(f"stream {stream}: {body.get('code')}: {body.get('message')}")
        self.stream = stream
        self.code = body.get("code")
        self.body = body


@dataclass
class Result:
    stream: int
    text: str = ""
    pieces: list[str] = field(default_factory=list)
    done: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


class Client:
    def __init__(self, host: str = "127.0.0.1", port: int = 8080, timeout: float = 60.0,
                 max_frame: int = 1 << 24) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = FrameDecoder(max_frame, allowed=p.SERVER_TYPES)
        self._pending: list[Frame] = []
        self.welcome: dict[str, Any] = {}

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_frame(self) -> Frame:
        """The next frame; raises ConnectionError when the server closed."""
        while not self._pending:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            self._pending.extend(self.decoder.feed(data))
        return self._pending.pop(0)

    def frames(self) -> Iterator[Frame]:
        while True:
            try:
                yield self.recv_frame()
            except ConnectionError:
                return

    def hello(self, token: str | None = None) -> dict[str, Any]:
        self.send(p.hello("llmctl-client/1.0", token))
        f = self.recv_frame()
        if f.type is FrameType.ERROR:
            raise ServerError(0, json.loads(f.payload))
        assert f.type is FrameType.WELCOME, f
        self.welcome = json.loads(f.payload)
        return self.welcome

    def generate(self, stream: int = 1, **fields: Any) -> None:
        self.send(p.generate(stream, **fields))

    def collect(self, streams: set[int]) -> dict[int, Result]:
        """Read until every stream in ``streams`` has ended."""
        results = {s: Result(s) for s in streams}
        open_ = set(streams)
        while open_:
            f = self.recv_frame()
            if f.stream == 0 and f.type is FrameType.ERROR:
                raise ServerError(0, json.loads(f.payload))
            r = results.get(f.stream)
            if r is None:
                continue
            if f.type is FrameType.TOKEN:
                piece = f.payload.decode("utf-8")  # strict: the server never splits a code point
                r.pieces.append(piece)
                r.text += piece
            elif f.type is FrameType.DONE:
                r.done = json.loads(f.payload)
                open_.discard(f.stream)
            elif f.type is FrameType.ERROR:
                r.error = json.loads(f.payload)
                open_.discard(f.stream)
        return results

    def complete(self, stream: int = 1, **fields: Any) -> Result:
        self.generate(stream, **fields)
        return self.collect({stream})[stream]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmctl.common.client")
    ap.add_argument("prompt")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--chat", action="store_true", help="send as a user message")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--token", default=None)
    args = ap.parse_args(argv)
    with Client(args.host, args.port) as c:
        c.hello(args.token)
        body: dict[str, Any] = {"max_tokens": args.max_tokens, "temperature": args.temperature}
        if args.chat:
            body["messages"] = [{"role": "user", "content": args.prompt}]
        else:
            body["prompt"] = args.prompt
        c.generate(1, **body)
        while True:
            f = c.recv_frame()
            if f.type is FrameType.TOKEN:
                sys.stdout.write(f.payload.decode("utf-8"))
                sys.stdout.flush()
            elif f.type in (FrameType.DONE, FrameType.ERROR):
                sys.stdout.write("\n")
                print(json.dumps(json.loads(f.payload)), file=sys.stderr)
                return 0 if f.type is FrameType.DONE else 1


if __name__ == "__main__":
    sys.exit(main())
