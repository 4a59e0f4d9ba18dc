"""What every engine of a worker shares: sequences, events, prompt preparation, sampling.

The engine (``worker/batch.py``) is stepped by the worker's loop: ``step()`` does one
bounded unit of work and returns the events it produced (``Event``: a TOKEN piece, the
DONE statistics or an error), so that the loop reads CANCELs and heartbeats between
units.  ``Prompting`` turns a request's fields into a ``Sequence`` (tokens, sampler chain,
text stream); ``reusable_prefix`` and ``prefill_chunk`` are the prefill rules that keep a
prompt-cache hit bit-identical to a miss.  ``TextStream`` turns token bytes into text that
never splits a code point and never shows any part of a stop string.
"""
from __future__ import annotations

import codecs
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from llmctl.common.errors import BadRequest
from llmctl.common.messages import DoneStats
from llmctl.common.request import GenRequest
from llmctl.common.prefix import request_hashes

log = logging.getLogger(__name__)

RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: a random seed


@dataclass
class Event:
    rid: int
    text: str = ""                         # a TOKEN piece, if non-empty
    done: DoneStats | None = None          # the DONE stats, when the sequence ended
    error: Exception | None = None         # an LlmctlError: the sequence failed (ERROR)
    logprobs: list[dict[str, Any]] | None = None   # entries of the tokens behind ``text``


@dataclass
class Sequence:
    rid: int
    tokens: list[int]
    max_tokens: int
    sampler: Any
    stream: TextStream
    window: int = 1 << 30                  # TOKEN messages it may still send
    n_prompt: int = 0                      # prompt tokens (``tokens`` grows when parked)
    cached: int = 0
    prefilled: int = 0
    generated: int = 0
    t_start: float = field(default_factory=time.monotonic)
    t_prefill_done: float | None = None
    hashes: tuple[int, ...] = ()           # prefix hashes of its prompt (routing)
    grammar: Any = None                    # constrain.Grammar of a constrained sequence
    top_logprobs: int = -1                 # -1: no logprobs; else alternatives per token
    token_ids: bool = False                # logprob entries carry token ids
    cache_prompt: bool = True              # False: no KV reuse for its prompt
    id_slot: int = -1                      # the slot it asks for (-1: any)
    lp_held: list[dict[str, Any]] = field(default_factory=list)  # not yet sent with text

    def __post_init__(self) -> None:
        self.n_prompt = self.n_prompt or len(self.tokens)


def reusable_prefix(n: int, last: int) -> int:
    """How much of ``n`` cached tokens (at most ``last``) to reuse for a prompt whose
    last token is at index ``last``: that token is always decoded like a generated one,
    and the prompt tokens prefilled before it are never exactly one (a 1-token chunk
    changes the KV on the CPU; worker/slots.py, "Exactness") unless nothing is cached."""
    return n - 1 if n > 0 and last - n == 1 else n


def prefill_chunk(left: int, n_batch: int) -> int:
    """The size of the next prefill chunk with ``left`` prompt tokens to go: at most
    ``n_batch``, and never one that would leave a 1-token chunk behind."""
    k = min(left, n_batch)
    return k - 1 if left - k == 1 and k > 2 else k


class ModelLoadError(RuntimeError):
    pass


def load_model(ll: Any, path: str, n_gpu_layers: int, failure: str) -> Any:
    """A GGUF's llama model with ``n_gpu_layers`` offloaded (-1: all); ModelLoadError
    ``failure: why`` if llama.cpp cannot load it."""
    from llama_cpp import _internals

    mp = ll.llama_model_default_params()
    mp.n_gpu_layers = 0x7FFFFFFF if n_gpu_layers == -1 else n_gpu_layers
    try:
        return _internals.LlamaModel(path_model=path, params=mp, verbose=False)
    except (ValueError, RuntimeError, OSError) as exc:
        raise ModelLoadError(f"{failure}: {exc}") from exc


class ModelRefused(ModelLoadError):
    """The models load but do not go together as configured (a draft model of another
    vocabulary): loading them again cannot help."""


class Prompting:
    """Prompt preparation shared by the engines: needs ``_model`` (a LlamaModel),
    ``_formatter`` (``chat_formatter``), ``n_ctx`` (per sequence) and ``seq_class``."""

    _model: Any
    _formatter: Any
    n_ctx: int
    seq_class: type = Sequence

    def tokenize_request(self, req: GenRequest) -> list[int]:
        model = self._model
        if req.messages:
            return self._render(req)[1]
        if req.prompt_parts is not None:
            return self._parts(req.prompt_parts)
        if req.prompt is None:
            raise BadRequest("exactly one of prompt and messages is required")
        return model.tokenize(req.prompt.encode("utf-8"), add_bos=True, special=False)

    def _parts(self, parts: tuple[int | str, ...]) -> list[int]:
        """Token ids and texts as one prompt; a BOS first when it starts with a text."""
        n, tokens = self._model.n_vocab(), []
        for i, p in enumerate(parts):
            if isinstance(p, str):
                tokens += self._model.tokenize(p.encode("utf-8"), add_bos=i == 0, special=True)
            elif not 0 <= p < n:
                raise BadRequest(f"prompt token {p} is not in [0, {n})")
            else:
                tokens.append(p)
        return tokens

    def utility(self, req: GenRequest) -> DoneStats:
        """A ``tokenize`` or ``detokenize`` request, answered at once (no slot)."""
        model = self._model
        if req.detokenize is not None:
            n = model.n_vocab()
            if any(t < 0 or t >= n for t in req.detokenize):
                raise BadRequest(f"tokens must be in [0, {n})")
            text = model.detokenize(list(req.detokenize)).decode("utf-8", "replace")
            return DoneStats(finish_reason="stop", phase="", text=text)
        if req.messages:
            text, tokens = self._render(req)
        else:
            text = req.prompt or ""
            tokens = model.tokenize(text.encode("utf-8"), add_bos=req.add_special,
                                    special=req.parse_special)
        pieces = None
        if req.with_pieces:
            pieces = []
            for t in tokens:
                b = model.detokenize([t])
                try:
                    pieces.append(b.decode("utf-8"))
                except UnicodeDecodeError:
                    pieces.append(list(b))
        return DoneStats(finish_reason="stop", prompt_tokens=len(tokens), phase="",
                         tokens=tokens, text=text, pieces=pieces)

    def _render(self, req: GenRequest) -> tuple[str, list[int]]:
        """A chat's prompt after the model's template, and its tokens.  An assistant
        message last is a prefill: the answer continues its content."""
        if self._formatter is None:
            raise BadRequest("this model has no chat template: send a prompt instead")
        msgs = [{"role": m.role, "content": m.content} for m in req.messages or ()]
        prefill = msgs.pop()["content"] if len(msgs) > 1 and msgs[-1]["role"] == "assistant" \
            else ""
        try:
            rendered = self._formatter(messages=msgs, **(req.template_kwargs or {}))
        except Exception as exc:  # jinja raises many types for bad conversations
            raise BadRequest(f"chat template rejected the messages: {exc}") from None
        add_bos = not getattr(rendered, "added_special", False)
        prompt = rendered.prompt + prefill
        return prompt, self._model.tokenize(prompt.encode("utf-8"), add_bos=add_bos,
                                            special=True)

    def prepare(self, rid: int, req: GenRequest) -> Any:
        """Validate against the model and build a sequence; raises BadRequest."""
        tokens = self.tokenize_request(req)
        if not tokens:
            raise BadRequest("the prompt is empty")
        if len(tokens) >= self.n_ctx:
            raise BadRequest(f"prompt is {len(tokens)} tokens; the context holds {self.n_ctx}")
        max_tokens = min(req.max_tokens, self.n_ctx - len(tokens))
        seq = self.seq_class(rid=rid, tokens=tokens, max_tokens=max_tokens,
                             window=req.window or 1 << 30,
                             sampler=make_sampler(req, self._model),
                             stream=TextStream(tuple(req.stop)),
                             top_logprobs=req.top_logprobs if req.logprobs else -1,
                             token_ids=req.token_ids, cache_prompt=req.cache_prompt,
                             id_slot=req.id_slot)
        seq.hashes = request_hashes(req)
        seq.grammar = make_grammar(req, self._model.vocab)
        if req.penalties:               # the penalties count the prompt's tokens too
            from llama_cpp import llama_sampler_accept
            for t in tokens:
                llama_sampler_accept(seq.sampler.sampler, t)
        return seq


def chat_formatter(model: Any, metadata: dict[str, str]) -> Any:
    """The model's own chat template (None if it has none)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = metadata.get("tokenizer.chat_template")
    if not template:
        return None

    def text_of(tok: int) -> str:
        return model.token_get_text(tok) if tok != -1 else ""

    return Jinja2ChatFormatter(template=template, eos_token=text_of(model.token_eos()),
                               bos_token=text_of(model.token_bos()))


def model_props(model: Any, metadata: dict[str, str], path: str) -> dict[str, Any]:
    """What llama-server's ``GET /props`` tells of the model."""
    def text_of(tok: int) -> str:
        return model.token_get_text(tok) if tok != -1 else ""

    return {"model_path": path, "chat_template": metadata.get("tokenizer.chat_template", ""),
            "bos_token": text_of(model.token_bos()), "eos_token": text_of(model.token_eos()),
            "n_vocab": model.n_vocab(), "n_ctx_train": model.n_ctx_train(),
            "n_params": model.n_params(), "size": model.size(),
            "n_embd": model.n_embd()}


def make_grammar(req: GenRequest, vocab: Any) -> Any:
    """The request's compiled grammar (``constrain.Grammar``), or None if it is free.
    Raises BadRequest for a schema or grammar that does not convert or compile."""
    if req.grammar is None and req.json_schema is None:
        return None
    import llama_cpp

    from llmctl.worker.constrain import Grammar, grammar_sampler, grammar_text

    gbnf = grammar_text(req.grammar, req.json_schema, req.or_text)
    return Grammar(llama_cpp, grammar_sampler(llama_cpp, vocab, gbnf)) if gbnf else None


SAMPLERS = ("penalties", "top_k", "top_p", "min_p", "temperature")   # the default order


def make_sampler(req: GenRequest, model: Any = None) -> Any:
    """A sampler chain: the logit biases, then the penalties and greedy at temperature 0,
    else penalties, top-k, top-p, min-p, temperature (or ``req.samplers``' order) and
    dist(seed).  With penalties the caller feeds the prompt's tokens to ``accept``."""
    from llama_cpp._internals import LlamaSampler

    sampler = LlamaSampler()
    if req.logit_bias and model is not None:
        sampler.add_logit_bias(model.n_vocab(), logit_biases(req.logit_bias, model))
    order = req.samplers if req.samplers is not None else SAMPLERS
    if req.temperature <= 0.0:
        if req.penalties and model is not None and "penalties" in order:
            sampler.add_penalties(model.n_vocab(), *req.penalties)
        sampler.add_greedy()
        return sampler
    for name in order:
        if name == "penalties" and req.penalties and model is not None:
            sampler.add_penalties(model.n_vocab(), *req.penalties)
        elif name == "top_k" and req.top_k:
            sampler.add_top_k(req.top_k)
        elif name == "top_p":
            sampler.add_top_p(req.top_p, 1)
        elif name == "min_p" and req.min_p:
            sampler.add_min_p(req.min_p, 1)
        elif name == "temperature":
            sampler.add_temp(req.temperature)
    sampler.add_dist(RANDOM_SEED if req.seed is None else req.seed)
    return sampler


def logit_biases(pairs: Any, model: Any) -> dict[int, float]:
    """``(token id or text, bias or None)`` pairs as ``{token id: bias}``: a text biases
    each of its tokens, None bans the token; BadRequest for an id outside the vocabulary."""
    n, out = model.n_vocab(), {}
    for tok, bias in pairs:
        b = float("-inf") if bias is None else float(bias)
        if isinstance(tok, str):
            for t in model.tokenize(tok.encode("utf-8"), add_bos=False, special=False):
                out[t] = b
        elif not 0 <= tok < n:
            raise BadRequest(f"logit_bias: token {tok} is not in [0, {n})")
        else:
            out[tok] = b
    return out


def done_stats(seq: Any, reason: str) -> DoneStats:
    """The DONE statistics of a sequence (either engine's)."""
    now = time.monotonic()
    prefill_end = seq.t_prefill_done or now
    return DoneStats(
        finish_reason=reason, prompt_tokens=seq.n_prompt, completion_tokens=seq.generated,
        cached_tokens=seq.cached, phase="prefill" if seq.t_prefill_done is None else "decode",
        prefill_ms=round((prefill_end - seq.t_start) * 1000, 3),
        decode_ms=round((now - prefill_end) * 1000, 3),
        stop_word=getattr(getattr(seq, "stream", None), "word", "") or None)


# ---- text: bytes -> whole code points -> stop strings ----------------------------------

class TextStream:
    def __init__(self, stop: tuple[str, ...] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._held = ""          # decoded text not yet released (may start a stop string)
        self.stopped = False     # a stop string was matched
        self.word = ""           # the stop string matched

    def push(self, piece: bytes) -> str:
        """Feed one token's bytes; return the text that is safe to send now."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(piece)
        return self._release(final=False)

    def finish(self) -> str:
        """End of generation: flush whatever is held (an incomplete code point
        becomes U+FFFD)."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text = self._held
        if not self._stop:
            self._held = ""
            return text
        cut, word = min(((i, s) for s, i in ((s, text.find(s)) for s in self._stop) if i >= 0),
                        default=(-1, ""))
        if cut >= 0:
            self.stopped, self.word = True, word
            self._held = ""
            return text[:cut]
        keep = 0 if final else _longest_partial(text, self._stop)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]


def _longest_partial(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


# ---- logprobs ---------------------------------------------------------------------------

def token_logprobs(logits: Any, tok: int, top: int, piece: Any,
                   ids: bool = False) -> dict[str, Any]:
    """OpenAI's logprob entry of the chosen token ``tok``: the log-softmax of the model's
    logits at that position (before temperature, top-k/top-p or a grammar reshape them,
    as OpenAI, vLLM and llama-server report them), with the ``top`` most likely tokens.
    ``piece(tok)`` is a token's bytes."""
    import numpy as np

    x = logits.astype(np.float64, copy=False)
    mx = float(x.max())
    lse = mx + float(np.log(np.exp(x - mx).sum()))

    def entry(t: int) -> dict[str, Any]:
        b = piece(t)
        e = {"token": b.decode("utf-8", "replace"), "logprob": float(x[t]) - lse,
             "bytes": list(b)}
        if ids:
            e["id"] = t
        return e

    out = entry(tok)
    alts: list[dict[str, Any]] = []
    if top > 0:
        idx = np.argpartition(-x, top - 1)[:top]
        alts = [entry(int(t)) for t in idx[np.argsort(-x[idx], kind="stable")]]
    out["top_logprobs"] = alts
    return out
