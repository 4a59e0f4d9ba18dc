"""llama-server's request fields and answer shapes (dataplane/http/llama_shapes.py) and
the worker's reading of them (logit biases), without the model."""
from __future__ import annotations

import pytest

from llmctl.common.errors import BadRequest, NotReady, Overloaded
from llmctl.common.messages import Finished
from llmctl.dataplane.http import llama_shapes as ls
from llmctl.dataplane.http.llama_server import health_error
from llmctl.worker.engine import TextStream, logit_biases


def test_logit_bias_in_each_of_llama_servers_forms():
    assert ls.logit_bias([[15043, 1.0], [15043, False], ["Hello", -0.5]]) == (
        (15043, 1.0), (15043, None), ("Hello", -0.5))
    # OpenAI's object: a key that is a number is a token id, any other a text
    assert ls.logit_bias({"42": -100, "hi": False}) == ((42, -100.0), ("hi", None))
    assert ls.logit_bias(None) == ()
    for bad in ([[1, "x"]], [[1]], [[True, 1.0]], "x", [[1, True]]):
        with pytest.raises(BadRequest) as e:
            ls.logit_bias(bad)
        assert e.value.param == "logit_bias"


def test_samplers_keep_their_order_and_drop_the_no_ops():
    assert ls.samplers(["temperature", "dry", "top_k"]) == ("temperature", "top_k")
    assert ls.samplers("kt") == ("top_k", "temperature")
    assert ls.samplers(None) is None
    with pytest.raises(BadRequest, match="mirostat"):
        ls.samplers(["mirostat"])


def test_fields_that_change_the_answer_are_refused_unless_no_ops():
    ls.refuse_unsupported({"typical_p": 1.0, "xtc_probability": 0, "mirostat": 0,
                           "top_n_sigma": -1, "n_cmpl": 1, "lora": []})
    for key, value in (("typical_p", 0.9), ("ignore_eos", True), ("n_cmpl", 2),
                       ("return_progress", True), ("top_n_sigma", 1.5)):
        with pytest.raises(BadRequest) as e:
            ls.refuse_unsupported({key: value})
        assert e.value.param == key


def test_sampling_fields():
    out = ls.sampling_fields({"min_p": 0.1, "cache_prompt": False, "id_slot": 1,
                              "chat_template_kwargs": {"x": 1}})
    assert out["min_p"] == 0.1 and out["cache_prompt"] is False and out["id_slot"] == 1
    assert out["template_kwargs"] == {"x": 1} and out["logit_bias"] == ()
    assert "penalties" not in out                   # all at their no-op values
    assert ls.sampling_fields({"repeat_penalty": 1.1})["penalties"] == (64, 1.1, 0.0, 0.0)
    assert ls.sampling_fields({"presence_penalty": 1, "repeat_last_n": -1})["penalties"] \
        == (1 << 16, 1.0, 0.0, 1.0)
    assert "penalties" not in ls.sampling_fields({"repeat_penalty": 2, "repeat_last_n": 0})
    for body in ({"min_p": 2}, {"cache_prompt": "no"}, {"id_slot": -2},
                 {"chat_template_kwargs": []}, {"presence_penalty": 3}, {"repeat_last_n": -2},
                 {"repeat_penalty": "x"}):
        with pytest.raises(BadRequest) as e:
            ls.sampling_fields(body)
        assert e.value.param == next(iter(body))


def test_prompt_forms():
    assert ls.prompt_parts("hi") == ("hi",)
    assert ls.prompt_parts([1, 2, 3]) == (1, 2, 3)
    assert ls.prompt_parts([1, "a", 2]) == (1, "a", 2)
    assert ls.prompt_parts(["one"]) == ("one",)
    for bad in (["a", "b"], [], [1.5], [True], {"prompt_string": "x"}, None):
        with pytest.raises(BadRequest) as e:
            ls.prompt_parts(bad)
        assert e.value.param == "prompt"


def test_timings_from_a_finished_request():
    fin = Finished(finish_reason="length", prompt_tokens=10, completion_tokens=4,
                   cached_tokens=6, prefill_ms=8.0, decode_ms=40.0, worker="w0",
                   ttft_ms=9.0, total_ms=50.0)
    t = ls.timings(fin)
    assert t["cache_n"] == 6 and t["prompt_n"] == 4 and t["prompt_per_token_ms"] == 2.0
    assert t["predicted_n"] == 4 and t["predicted_per_second"] == 100.0
    empty = ls.timings(Finished(finish_reason="stop", prompt_tokens=0, completion_tokens=0,
                                worker="", ttft_ms=0, total_ms=0))
    assert empty["prompt_per_second"] == 0.0 and empty["predicted_per_token_ms"] == 0.0


def test_error_and_health_shapes():
    assert ls.error_body(BadRequest("no", param="x")) == {
        "error": {"code": 400, "message": "no", "type": "invalid_request_error"}}
    assert ls.error_body(Overloaded("full"))["error"] == {
        "code": 429, "message": "full", "type": "unavailable_error"}
    body = health_error(NotReady("no worker is ready"), loading=True)
    assert body["error"] == {"code": 503, "message": "Loading model",
                             "type": "unavailable_error"}
    assert body["status"] == "not_ready" and body["reason"] == "no worker is ready"


class _Vocab:
    """Tokenizes a text one token per character (its code point)."""

    def n_vocab(self) -> int:
        return 1000

    def tokenize(self, text: bytes, add_bos: bool, special: bool) -> list[int]:
        assert not add_bos
        return [ord(c) for c in text.decode()]


def test_worker_reads_logit_biases_with_texts_as_their_tokens():
    assert logit_biases(((5, 1.0), ("ab", None)), _Vocab()) == {
        5: 1.0, 97: float("-inf"), 98: float("-inf")}
    with pytest.raises(BadRequest, match="1000"):
        logit_biases(((1000, 1.0),), _Vocab())


def test_text_stream_tells_the_stop_word():
    ts = TextStream(("END", "stop"))
    assert ts.push(b"a stop here END") == "a "
    assert ts.stopped and ts.word == "stop"
