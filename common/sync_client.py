"""The wire protocol's client, blocking, for tests and scripts (``client.Connection`` is the
one implementation): each ``Client`` runs its ``Connection``'s coroutines on a private event
loop. Its ``timeout`` bounds every call (for ``collect``, the silence between two frames).

    python -m llmctl.common.sync_client --host 127.0.0.1 --port 8080 "Once upon a time"
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any, Awaitable, Iterator, TypeVar

from llmctl.common.client import MAX_FRAME, Connection, Result, ServerError
from llmctl.common.protocol import Frame

__all__ = ["Client", "main"]

T = TypeVar("T")
_OWN = object()               # Client._run: the client's own timeout


class Client:
    """A blocking ``Connection``: the API of the tests (``hello`` is not done for you)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8080, timeout: float = 60.0,
                 max_frame: int = MAX_FRAME) -> None:
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        try:
            self._conn: Connection = self._run(Connection.open(
                host, port, hello=False, timeout=timeout, max_frame=max_frame))
        except BaseException:
            self._loop.close()
            raise

    def _run(self, aw: Awaitable[T], timeout: Any = _OWN) -> T:
        """Run ``aw`` on this client's loop within ``timeout`` (default: the client's)."""
        limit = self.timeout if timeout is _OWN else timeout
        return self._loop.run_until_complete(asyncio.wait_for(aw, limit))

    @property
    def connection(self) -> Connection:
        return self._conn

    @property
    def welcome(self) -> dict[str, Any]:
        return self._conn.welcome

    @property
    def sock(self) -> Any:
        """The socket (to shut it down under a running stream, say)."""
        return self._conn.writer.get_extra_info("socket")

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self._conn.close())
        finally:
            self._loop.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self._run(self._conn.send(data))

    def hello(self, token: str | None = None) -> dict[str, Any]:
        return self._run(self._conn.hello(token))

    def recv_frame(self) -> Frame:
        """The next frame; raises ConnectionError when the server closed."""
        return self._run(self._conn.recv_frame())

    def frames(self) -> Iterator[Frame]:
        while True:
            try:
                yield self.recv_frame()
            except ConnectionError:
                return

    def generate(self, stream: int = 1, /, **fields: Any) -> None:
        self._run(self._conn.generate(stream, **fields))

    def collect(self, streams: set[int]) -> dict[int, Result]:
        """Read until every stream in ``streams`` has ended. ServerError if the server
        refused on stream 0, ConnectionError if it closed first."""
        results = self._run(self._conn.collect(streams, idle_timeout=self.timeout), None)
        if any(r.cut for r in results.values()):
            if self._conn.close_error is not None:
                raise ServerError(0, self._conn.close_error)
            raise ConnectionError(f"the server closed the connection ({self._conn.why[1]})")
        return results

    def complete(self, stream: int = 1, /, **fields: Any) -> Result:
        self.generate(stream, **fields)
        return self.collect({stream})[stream]

    def ping(self, payload: bytes = b"") -> float:
        return self._run(self._conn.ping(payload))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmctl.common.sync_client")
    ap.add_argument("prompt")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--chat", action="store_true", help="send as a user message")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--token", default=None)
    ap.add_argument("--model", default=None, help="a served model (default: the first)")
    args = ap.parse_args(argv)
    with Client(args.host, args.port) as c:
        c.hello(args.token)
        body: dict[str, Any] = {"max_tokens": args.max_tokens, "temperature": args.temperature,
                                "model": args.model}
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
