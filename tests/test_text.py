"""TextStream: whole code points only, stop strings never leak."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from llmctl.worker.engine import TextStream


def feed(stream: TextStream, pieces: list[bytes]) -> tuple[list[str], str]:
    out = [stream.push(p) for p in pieces]
    return out, "".join(out) + stream.finish()


def test_split_code_point_is_held_back():
    s = TextStream()
    euro = "€".encode()
    assert s.push(euro[:1]) == ""
    assert s.push(euro[1:]) == "€"


@given(st.text(max_size=200), st.lists(st.integers(1, 7), max_size=50))
def test_any_byte_split_reassembles(text, cuts):
    data = text.encode()
    pieces, i = [], 0
    for c in cuts:
        pieces.append(data[i:i + c])
        i += c
    pieces.append(data[i:])
    out, full = feed(TextStream(), pieces)
    assert full == text
    for piece in out:
        piece.encode("utf-8")  # never a lone surrogate or split


def test_stop_string_across_pieces():
    out, full = feed(TextStream(("\n\n",)), [b"Hello", b"\n", b"\nWorld"])
    assert full == "Hello"
    assert out == ["Hello", "", ""]


def test_partial_stop_released_when_it_does_not_match():
    s = TextStream(("END",))
    assert s.push(b"abE") == "ab"
    assert s.push(b"Nx") == "ENx"
    assert not s.stopped


@given(st.text(alphabet="abc\n", max_size=60), st.sampled_from(["\n\n", "ab", "c", "bca"]))
def test_output_is_prefix_before_first_stop(text, stop):
    data = text.encode()
    _, full = feed(TextStream((stop,)), [data[i:i + 1] for i in range(len(data))])
    i = text.find(stop)
    assert full == (text[:i] if i >= 0 else text)


def test_invalid_utf8_becomes_replacement_character():
    _, full = feed(TextStream(), [b"a\xffb", b"\xe2\x82"])
    assert full == "a\ufffdb\ufffd"
