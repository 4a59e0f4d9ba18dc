"""Speculative decoding with a draft model (worker/draft_model.py): the config of
``speculative = "draft"`` / ``draft``, the vocabulary check and the adaptation, pure; on
the real models (``integration``) the target's output with the Q8_0 quantization of the
same model drafting for the Q4_1 one, against decoding one token at a time."""
from __future__ import annotations

import types

import pytest

from llmctl.common import config
from llmctl.common.config import ConfigError
from llmctl.worker.draft_model import ModelDrafter, check_vocab
from llmctl.worker.engine import ModelRefused
from llmctl.worker.speculate import PROBE
from tests.service import MODEL, MODEL_B
from tests.test_batching import drive
from tests.test_speculate import (FREE, GROUNDED, N_BATCH, N_CTX, compare_opting_out,
                                  on_and_off, plain4)  # noqa: F401 (plain4: a fixture)

TWO = ('[[models]]\nname = "big"\npath = "a.gguf"\nspeculative = "draft"\ndraft = "small"\n'
       'spec_max_draft = 6\n[[models]]\nname = "small"\npath = "b.gguf"\nn_gpu_layers = 0\n'
       'load = "on_demand"\n')


def load(tmp_path, text: str) -> config.Config:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return config.load(path)


def test_a_worker_of_the_target_runs_with_its_draft_entry(tmp_path):
    cfg = load(tmp_path, TWO)
    big, small = cfg.served
    w = cfg.for_model(big)
    assert (w.model.speculative, w.model.spec_max_draft) == ("draft", 6)
    assert w.default_model == big and w.entry(big.draft).path == small.path
    assert w.entry("small").n_gpu_layers == 0
    # only what the worker loads of it: its own serving settings roll no worker of big's
    assert cfg.for_model(big) == load(tmp_path, TWO.replace('load = "on_demand"', 'slots = 3')
                                      ).for_model(big)
    assert config.Config.from_json(w.to_json()) == w      # what the worker parses
    assert cfg.for_model(small).served == (small,)         # its own workers: no draft


@pytest.mark.parametrize("text, message", [
    (TWO.replace('draft = "small"', 'draft = "tiny"'),
     "[[models]] entry 1 ('big'): draft = 'tiny' names no [[models]] entry (there are 'big', "
     "'small')"),
    (TWO.replace('draft = "small"', 'draft = "big"'),
     "[[models]] entry 1 ('big'): draft = 'big' names the entry itself: a draft is another, "
     "smaller model"),
    (TWO.replace('draft = "small"\n', ''),
     "[[models]] entry 1 ('big'): speculative = 'draft' needs draft = the name of another "
     "[[models]] entry"),
    (TWO.replace('speculative = "draft"', 'speculative = "ngram"'),
     "[[models]] entry 1 ('big'): draft = 'small' needs speculative = 'draft' (it is 'ngram')"),
    ('[model]\npath = "m.gguf"\nspeculative = "draft"\n',
     "[model] speculative = 'draft': a draft model is another [[models]] entry; serve both as "
     "[[models]] and set draft"),
])
def test_draft_errors_name_the_entry_and_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, text)
    assert str(exc.value) == f"{tmp_path / 'c.toml'}: {message}"


class FakeModel:
    """What check_vocab reads of a LlamaModel."""

    def __init__(self, texts: list[str], kind: str = "gpt2") -> None:
        self.texts, self.vocab, self.kind = texts, texts, kind

    def metadata(self) -> dict[str, str]:
        return {"tokenizer.ggml.model": self.kind}

    def token_get_text(self, t: int) -> str:
        return self.texts[t]

    def token_bos(self) -> int:
        return 1

    def token_eos(self) -> int:
        return 2


LL = types.SimpleNamespace(llama_vocab_n_tokens=len)
VOCAB = [f"t{i}" for i in range(5000)]


def test_the_vocabulary_check():
    check_vocab(LL, "d", FakeModel(VOCAB), FakeModel(list(VOCAB)))
    with pytest.raises(ModelRefused, match="draft = 'd': its vocabulary has 4999 tokens, "
                                             "the target's 5000"):
        check_vocab(LL, "d", FakeModel(VOCAB), FakeModel(VOCAB[:-1]))
    with pytest.raises(ModelRefused, match="its tokenizer is 'llama', the target's 'gpt2'"):
        check_vocab(LL, "d", FakeModel(VOCAB), FakeModel(VOCAB, "llama"))
    other = list(VOCAB)
    other[2] = "</s>"                                      # the target's EOS differs
    with pytest.raises(ModelRefused, match="token 2 is '</s>' there, 't2' in the target"):
        check_vocab(LL, "d", FakeModel(VOCAB), FakeModel(other))


def test_a_draft_as_costly_as_the_target_only_probes():
    d = ModelDrafter([1, 2, 3], max_draft=8, cost=1.0)
    assert d.length(16) == PROBE
    d.verified(PROBE, PROBE)                  # kept: still no draft pays its cost
    assert d.length(16) == 0 and d.paused
    cheap = ModelDrafter([1, 2, 3], max_draft=8, cost=0.05)
    lengths = []
    for _ in range(10):
        lengths.append(cheap.length(16))
        cheap.verified(lengths[-1], lengths[-1])
    assert lengths[0] == PROBE and lengths[1:] == sorted(lengths[1:]) and lengths[-1] == 8
    assert cheap.length(5) == 5
    cheap.push(4)
    assert cheap.tokens == [1, 2, 3, 4]


# ---- the engine: the draft model's drafts verified in the batch ----------------------

def eager(engine):
    """Drafts as long as the limits allow, from the first step: every draft token is
    verified (the adaptation would draft little with a draft as costly as the target)."""
    make = engine.draft_model.drafter

    def drafter(tokens, max_draft):
        d = make(tokens, max_draft)
        d.extra_cost, d.probe, d.kept = 0.0, False, 1000.0
        return d

    engine.draft_model.drafter = drafter
    return engine


@pytest.fixture(scope="module")
def draft4():
    from llmctl.worker.batch import BatchEngine
    assert MODEL_B.is_file(), "the Q8_0 model is missing: run `make setup`"
    return eager(BatchEngine(str(MODEL), N_CTX, 0, 1, N_BATCH, slots=4, prompt_cache=False,
                             spec_max_draft=8, draft=("q8", str(MODEL_B), 0)))


def assert_draft_kv_consistent(engine) -> None:
    """The draft context's KV holds what ``held`` says, per slot."""
    dm = engine.draft_model
    assert [dm._ll.llama_memory_seq_pos_max(dm._mem, i) for i in range(len(dm.held))] == \
        [len(h) - 1 for h in dm.held]


@pytest.mark.integration
def test_a_draft_model_changes_no_greedy_output(plain4, draft4):
    """Grounded and free prompts on four slots, with stop strings, a JSON schema and
    logprobs; every third request opts out and is batched with drafting ones."""
    drafted, accepted = compare_opting_out(plain4, draft4, "the draft model")
    # two quantizations of one model agree on most tokens
    assert accepted >= 0.5 * drafted > 0, (accepted, drafted)
    assert_draft_kv_consistent(draft4)


@pytest.mark.integration
def test_seeded_sampling_is_the_same_with_a_draft_model(plain4, draft4):
    reqs = [{**p, "max_tokens": 32, "temperature": 0.7, "top_k": 40, "top_p": 0.95,
             "seed": 7 + i} for i, p in enumerate(GROUNDED[:4] + FREE[:3])]
    want = drive(plain4, [(i, f, 0) for i, f in enumerate(reqs)])
    got = drive(draft4, [(i, f, 0) for i, f in enumerate(reqs)])
    assert {i: got[i][0] for i in want} == {i: want[i][0] for i in want}
    assert sum(got[i][1].get("accepted", 0) for i in got) > 0
    assert_draft_kv_consistent(draft4)


class CountingLlama:
    """llama_cpp, counting llama_decode calls."""

    def __init__(self, ll) -> None:
        self._ll, self.decodes = ll, 0

    def __getattr__(self, name: str):
        return getattr(self._ll, name)

    def llama_decode(self, ctx, batch):
        self.decodes += 1
        return self._ll.llama_decode(ctx, batch)


@pytest.mark.integration
def test_a_draft_of_k_tokens_is_k_decodes_for_all_sequences(draft4):
    """Four sequences drafting together: each step's drafts cost the draft model as many
    llama_decode calls as the longest draft has tokens, however many sequences draft."""
    dm = draft4.draft_model
    counting, calls = CountingLlama(dm._ll), []
    draft = dm.draft

    def counted(asks):
        before = counting.decodes
        out = draft(asks)
        calls.append((len(asks), max(k for _, _, k in asks), counting.decodes - before,
                      min(map(len, out))))
        return out

    dm._ll, dm.draft = counting, counted
    try:
        got = drive(draft4, [(i, {"prompt": p, "max_tokens": 64, "temperature": 0.0}, 0)
                             for i, p in enumerate(["1, 2, 3, 4, 5,", "10, 11, 12, 13,",
                                                    "2, 4, 6, 8,", "100, 101, 102,"])])
    finally:
        dm._ll = counting._ll
        del dm.draft
    assert all(got[i][1]["drafted"] > 0 for i in got)
    assert all(decodes <= k for _, k, decodes, _ in calls), calls
    assert any(n == 4 and shortest >= 2 for n, _, _, shortest in calls), calls
    assert_draft_kv_consistent(draft4)


@pytest.mark.integration
def test_a_service_with_a_draft_model_reports_it(make_service):
    """``speculative = "draft"`` on a [[models]] entry naming the Q8_0 one: a request
    drafts (the probes of the adaptation) and answers what ``speculative: false`` does."""
    common = {"n_ctx": 512, "threads": 1}
    s = make_service(models=[
        {"name": "a", "path": str(MODEL), "speculative": "draft", "draft": "b", **common},
        {"name": "b", "path": str(MODEL_B), "load": "on_demand", **common}],
        workers={"prompt_cache_mib": 0})
    on_and_off(s)


def test_the_memory_plan_counts_the_draft_in_each_worker_of_the_target(tmp_path):
    """The draft's weights, its KV (the target's n_ctx x slots at the draft's layers)
    and compute buffers are in every worker of the target."""
    from llmctl.control.models import memory_plan
    entries = (f'[[models]]\nname = "a"\npath = "{MODEL}"\nn_ctx = 4096\nslots = 2\n'
               f'workers = 2\nspeculative = "draft"\ndraft = "b"\n'
               f'[[models]]\nname = "b"\npath = "{MODEL_B}"\nn_ctx = 4096\nslots = 2\n'
               '[workers]\nprompt_cache_mib = 0\n')
    with_draft, _, kind = memory_plan(load(tmp_path, entries))
    alone, _, _ = memory_plan(load(tmp_path, entries.replace(
        'speculative = "draft"\ndraft = "b"\n', '')))
    assert kind == "ram" and with_draft["b"] == alone["b"]
    assert with_draft["a"] - alone["a"] == pytest.approx(2 * alone["b"])   # b has a's shape
    kv_b = 4096 * 2 * 30 * 3 * 64 * 2 * 2 / 2**20           # 30 layers x 3 KV heads x 64
    assert alone["b"] > kv_b + MODEL_B.stat().st_size / 2**20 * 0.9


def other_vocabulary(src, dest, tok: int = 9600) -> None:
    """A copy of the GGUF ``src`` whose token ``tok`` has another text (of its length)."""
    from gguf import GGUFReader
    field = GGUFReader(str(src)).fields["tokenizer.ggml.tokens"]
    text = bytes(field.parts[field.data[tok]])
    data = bytearray(src.read_bytes())
    at = data.index(len(text).to_bytes(8, "little") + text, data.index(b"tokenizer.ggml.tokens"))
    data[at + 8:at + 8 + len(text)] = b"#" * len(text)
    dest.write_bytes(data)


@pytest.mark.integration
def test_a_draft_of_another_vocabulary_fails_the_start_at_once(make_service, tmp_path):
    """The worker refuses the pair when it loads them: the start fails with the reason,
    the worker FATAL after one try (no crash loop)."""
    other = tmp_path / "other.gguf"
    other_vocabulary(MODEL, other)
    s = make_service(models=[
        {"name": "a", "path": str(MODEL), "speculative": "draft", "draft": "b", "n_ctx": 512},
        {"name": "b", "path": str(other), "load": "on_demand", "n_ctx": 512}],
        control={"max_restarts": 5, "restart_window_s": 600.0})
    r = s.start()
    assert r.returncode != 0
    assert "draft = 'b': token 9600 is '" in r.stderr, r.stderr
    assert "a draft model must have the target's vocabulary" in r.stderr
    assert "exit code 78: its configuration was refused" in r.stderr
