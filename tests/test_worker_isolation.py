"""A worker serves on whatever one request or one message does (real model, in-process).

The gateway refuses the poisons it can see (tests/test_hardening.py); these tests feed
them to a worker directly, as a gateway bug or a version mismatch would, and show that
only the request fails (ERROR), never the worker."""
from __future__ import annotations


import msgspec
import pytest

from llmctl.common.config import Config
from llmctl.common import messages as m
from tests.service import MODEL
from llmctl.worker.main import Worker

pytestmark = pytest.mark.integration         # the real model, loaded in-process


@pytest.fixture(scope="module")
def worker():
    from llmctl.worker.batch import BatchEngine
    engine = BatchEngine(str(MODEL), 512, 0, 1, 32, slots=2)
    return Worker(Config(), "w0.1", "inproc://unused", engine)


def records(outs: list[list[bytes]]) -> list[tuple[m.Kind, int, dict | str]]:
    """The (kind, rid, body) of what the worker would send, as the gateway reads it."""
    got: list[tuple[m.Kind, int, dict | str]] = []
    for frames in outs:
        msg = m.from_worker(frames)
        for item in msg.items if isinstance(msg, m.Batch) else [msg]:
            if isinstance(item, m.Token):
                got.append((m.Kind.TOKEN, item.rid, item.text))
            elif isinstance(item, m.Done):
                got.append((m.Kind.DONE, item.rid, msgspec.to_builtins(item.stats)))
            elif isinstance(item, m.Error):
                got.append((m.Kind.ERROR, item.rid, msgspec.to_builtins(item.error)))
    return got


def run(worker: Worker, outs: list[list[bytes]], max_steps: int = 500) -> list:
    """Step the engine until idle; everything sent, in order."""
    for _ in range(max_steps):
        if not worker.engine.running:
            break
        recs = [r for ev in worker.engine.step() for r in worker._records(ev)]
        if recs:
            outs.append(m.encode_batch(recs))
    return records(outs)


def generate(rid: int, body: bytes | dict) -> list[bytes]:
    return m.encode(m.Kind.GENERATE, rid, body)


def served(worker: Worker, rid: int) -> None:
    got = run(worker, worker._handle(generate(rid, {"prompt": "Once upon a time",
                                                    "max_tokens": 4, "temperature": 0.0})))
    ends = [(k, body) for k, r, body in got if r == rid and k in (m.Kind.DONE, m.Kind.ERROR)]
    assert ends and ends[0][0] is m.Kind.DONE and ends[0][1]["completion_tokens"] == 4, got


@pytest.mark.parametrize("body", [
    b'{"prompt": "ab\\ud800", "max_tokens": 4}',
    b'{"messages": [{"role": "user", "content": "x\\ud800"}], "max_tokens": 4}',
    b'{"prompt": "hi", "max_tokens": "four"}',
    b'{"prompt": 7, "max_tokens": 4}',
    b'not json at all',
    b'{"max_tokens": 4}',
])
def test_a_poison_generate_ends_that_request_only(worker, body):
    got = records(worker._handle(generate(11, body)))
    assert [(k, r) for k, r, _ in got] == [(m.Kind.ERROR, 11)], got
    assert got[0][2]["code"] in ("internal", "bad_request")
    assert not worker.engine.running and worker.engine.free_slots == 2
    served(worker, 12)


@pytest.mark.parametrize("frames", [
    [b"Z", b"", b""],                                   # unknown kind
    [b"G", b"\x00\x01", b"{}"],                         # a request id of 2 bytes
    [b"K", b"", b"\x00" * 7],                           # CREDIT that is not whole pairs
    [b"G"],                                             # one frame
    [b"C", b"\xff" * 8, b"", b"extra"],                 # four frames
])
def test_malformed_internal_messages_are_dropped_and_counted(worker, frames):
    before = worker.dropped
    assert worker._handle(frames) == []
    assert worker.dropped == before + 1
    served(worker, 21)


def test_an_exception_while_serving_fails_one_sequence_not_the_others(worker, monkeypatch):
    engine = worker.engine
    real = engine._advance

    def advance(seq, tok):
        if seq.rid == 31 and seq.generated >= 2:
            raise RuntimeError("a bug in one sequence's sampling")
        return real(seq, tok)

    monkeypatch.setattr(engine, "_advance", advance)
    outs = worker._handle(generate(31, {"prompt": "One two three", "max_tokens": 16,
                                        "temperature": 0.0}))
    outs += worker._handle(generate(32, {"prompt": "The sea is", "max_tokens": 8,
                                         "temperature": 0.0}))
    got = run(worker, outs)
    ends = {r: (k, body) for k, r, body in got if k in (m.Kind.DONE, m.Kind.ERROR)}
    assert ends[31][0] is m.Kind.ERROR and ends[31][1]["code"] == "internal"
    assert "RuntimeError" in ends[31][1]["message"]
    assert ends[32][0] is m.Kind.DONE and ends[32][1]["completion_tokens"] == 8
    monkeypatch.undo()
    served(worker, 33)
