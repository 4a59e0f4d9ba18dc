"""Constrained sampling: a request's JSON schema or GBNF grammar as a llama.cpp sampler.

``grammar_text`` turns a GenRequest's ``json_schema`` into GBNF with the converter
llama-cpp-python ships (``llama_cpp.llama_grammar.json_schema_to_gbnf``) or takes its
``grammar`` as is; ``grammar_sampler`` compiles it with ``llama_sampler_init_grammar``.
Both run in ``prepare()``, before the request takes a slot, and raise ``BadRequest``
naming the problem: the converter's message, or the parse error llama.cpp writes to
stderr (captured here, since llama.cpp does not return it).

The grammar sampler stands beside the sequence's chain (``Grammar``): every token the
sequence takes is one the grammar allows, and the grammar advances with it.
The grammar permits end-of-generation only where the grammar is complete, so a
constrained answer ends with EOG (``finish_reason: stop``) once it is whole JSON, or is
cut by ``max_tokens`` (``length``: then it is not whole).
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import tempfile
from typing import Any

from llmctl.common.errors import BadRequest

log = logging.getLogger(__name__)

MAX_ERROR = 300      # characters of llama.cpp's parse error quoted back


# tool_choice "auto": the call's JSON, or an answer in words (never starting with "{")
_OR_TEXT = '\nroot ::= json-root | free-text\nfree-text ::= [^{] [^\\x00]*\n'


def grammar_text(grammar: str | None, json_schema: str | None,
                 or_text: bool = False) -> str | None:
    """The GBNF a request is constrained by (None: unconstrained).  ``or_text``: the
    schema's JSON or else free text that does not start with "{"."""
    if json_schema is None:
        return grammar
    gbnf = _convert(json_schema)
    if not or_text:
        return gbnf
    return "\n".join("json-" + ln if ln.startswith("root ::= ") else ln
                     for ln in gbnf.split("\n")) + _OR_TEXT


def _convert(json_schema: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return strict_json_chars(json_schema_to_gbnf(json_schema))
    except RecursionError:
        raise BadRequest("the JSON schema cannot be converted to a grammar: "
                         "it nests too deeply") from None
    except (json.JSONDecodeError, AssertionError, ValueError, KeyError, TypeError,
            AttributeError, IndexError, NotImplementedError) as exc:
        why = str(exc) or type(exc).__name__
        raise BadRequest(f"the JSON schema cannot be converted to a grammar: {why}") from None


# The converter's string character (0.3.36) admits raw control characters, which JSON
# forbids in strings (RFC 8259, section 7): a model that writes a newline inside a
# string would give JSON no parser reads.  llama.cpp's own converter excludes them.
_LOOSE_CHAR = r'char ::= [^"\\] | '
_STRICT_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] | '


def strict_json_chars(gbnf: str) -> str:
    """The converter's grammar with JSON's string characters (no raw control characters)."""
    lines = gbnf.split("\n")
    return "\n".join(_STRICT_CHAR + ln[len(_LOOSE_CHAR):] if ln.startswith(_LOOSE_CHAR) else ln
                     for ln in lines)


def _capture_stderr(fn: Any) -> tuple[Any, str]:
    """Run ``fn()`` with file descriptor 2 sent to a temporary file; (result, what it wrote)."""
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            try:
                result = fn()
            finally:
                os.dup2(saved, 2)
        finally:
            os.close(saved)
        tmp.seek(0)
        return result, tmp.read(64 * 1024).decode("utf-8", "replace")


def _parse_error(stderr: str) -> str:
    """The useful line of llama.cpp's grammar parse error."""
    for line in stderr.splitlines():
        if "error parsing grammar" in line:
            return line.split("error parsing grammar:", 1)[-1].strip()[:MAX_ERROR]
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    return (lines[0] if lines else "llama.cpp refused it")[:MAX_ERROR]


def grammar_sampler(ll: Any, vocab: Any, gbnf: str) -> Any:
    """A llama.cpp grammar sampler for ``gbnf`` (root rule ``root``); BadRequest if it
    does not compile.  The caller adds it to a chain, which then owns it."""
    if not re.search(r"^\s*root\s*::=", gbnf, re.M):
        raise BadRequest("the grammar does not compile: it has no rule named 'root'")

    def init() -> Any:
        return ll.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), b"root")

    smpl, err = _capture_stderr(init)
    if not smpl:
        raise BadRequest(f"the grammar does not compile: {_parse_error(err)}")
    return smpl


class Grammar:
    """A compiled grammar beside a sequence's sampler chain, used as llama.cpp's own
    ``common_sampler`` does: the chain samples from the free distribution first; if the
    grammar accepts that token (a one-candidate check, cheap) it is taken, else the
    grammar masks the whole vocabulary and the chain samples again from what is left.
    Applying the grammar to every one of the vocabulary's tokens at every step instead
    costs several milliseconds a token (49,152 candidates for SmolLM2).  Greedy output is
    the same either way (the most likely token the grammar allows); a sampled one is the
    free choice when it is allowed, else a choice among the allowed ones."""

    _scratch: dict[int, tuple[Any, Any]] = {}    # n_vocab -> (numpy candidates, array)

    def __init__(self, ll: Any, smpl: Any) -> None:
        self._ll = ll
        self.smpl = smpl
        self._one = (ll.llama_token_data * 1)()
        self._one_arr = ll.llama_token_data_array(data=self._one, size=1, selected=-1,
                                                  sorted=False)
        self.rejected = 0           # tokens the free chain chose and the grammar refused

    def __del__(self) -> None:
        if self.smpl is not None:
            self._ll.llama_sampler_free(self.smpl)
            self.smpl = None

    def allows(self, tok: int) -> bool:
        one = self._one[0]
        one.id, one.logit, one.p = tok, 1.0, 0.0
        self._one_arr.size, self._one_arr.selected, self._one_arr.sorted = 1, -1, False
        self._ll.llama_sampler_apply(self.smpl, ctypes.byref(self._one_arr))
        return one.logit != float("-inf")

    def sample(self, chain: Any, ctx: Any, i: int, n_vocab: int) -> int:
        """The next token of a constrained sequence at output row ``i``; accepted by the
        grammar (the chain accepts what it samples, as ``llama_sampler_sample`` does)."""
        import numpy as np

        ll = self._ll
        tok = ll.llama_sampler_sample(chain, ctx, i)
        if not self.allows(tok):
            self.rejected += 1
            data, arr = self._candidates(n_vocab)
            logits = np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
            data.id[:] = np.arange(n_vocab, dtype=np.intc)
            data.logit[:] = logits
            data.p[:] = 0.0
            arr.size, arr.selected, arr.sorted = n_vocab, -1, False
            ll.llama_sampler_apply(self.smpl, ctypes.byref(arr))
            if np.isneginf(data.logit).all():
                # Accepting any token now would make llama.cpp abort the process.
                raise BadRequest("the grammar allows no token of this model's vocabulary "
                                 "at this point of the output")
            ll.llama_sampler_apply(chain, ctypes.byref(arr))
            tok = int(data.id[arr.selected])
        ll.llama_sampler_accept(self.smpl, tok)
        return tok

    def _candidates(self, n_vocab: int) -> tuple[Any, Any]:
        got = self._scratch.get(n_vocab)
        if got is None:
            import numpy as np

            data = np.recarray((n_vocab,), dtype=np.dtype(
                [("id", np.intc), ("logit", np.single), ("p", np.single)], align=True))
            arr = self._ll.llama_token_data_array(
                data=data.ctypes.data_as(self._ll.llama_token_data_p), size=n_vocab,
                selected=-1, sorted=False)
            got = self._scratch[n_vocab] = (data, arr)
        return got
