"""[[models]]: several served models in the one typed tree; [model] alone still works."""
from __future__ import annotations

from pathlib import Path

import pytest

from llmctl.common import config, config_explain
from llmctl.common.config import Config, ConfigError

TWO = """
[[models]]
name = "chat"
path = "a.gguf"
n_ctx = 1024
slots = 4
[[models]]
name = "code"
path = "b.gguf"
load = "on_demand"
keep_alive_s = 30
workers = 2
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_one_model_section_is_one_model_named_after_its_file(tmp_path):
    cfg = config.load(write(tmp_path, '[model]\npath = "m/SmolLM2.Q4_1.gguf"\nn_ctx = 512\n'
                                      '[workers]\ncount = 2\nslots = 3\n'))
    (e,) = cfg.served
    assert (e.name, e.path, e.n_ctx, e.workers, e.slots, e.load) == \
        ("SmolLM2.Q4_1", str(tmp_path / "m/SmolLM2.Q4_1.gguf"), 512, 2, 3, "always")
    assert cfg.models == () and cfg.entry(None) is e and cfg.entry("other") is None
    # what a worker runs is the config's own [model]/[workers]
    w = cfg.for_model(e)
    assert w.model == cfg.model and w.workers == cfg.workers and w.default_model == e


def test_models_entries_normalised_and_resolved(tmp_path):
    cfg = config.load(write(tmp_path, TWO))
    chat, code = cfg.served
    assert cfg.default_model is chat and cfg.entry("code") is code
    assert chat.path == str(tmp_path / "a.gguf") and chat.slots == 4 and chat.load == "always"
    assert code.load == "on_demand" and code.keep_alive_s == 30.0 and code.workers == 2
    w = cfg.for_model(code)
    assert (w.model.path, w.model.n_ctx, w.workers.count, w.workers.slots) == \
        (code.path, 2048, 2, 1)
    assert w.default_model == code
    assert Config.from_json(cfg.to_json()) == cfg
    assert Config.from_json(w.to_json()) == w


@pytest.mark.parametrize("text, message", [
    (TWO.replace('name = "code"', 'name = "chat"'),
     "[[models]] entry 2 ('chat'): duplicate name (entry 1 has it too)"),
    (TWO.replace("workers = 2", "workers = 0"),
     "[[models]] entry 2 ('code') workers: 0 is out of range [1, 64]"),
    (TWO.replace('load = "on_demand"', 'load = "lazy"'),
     "[[models]] entry 2 ('code') load: 'lazy' is not one of always, on_demand"),
    (TWO.replace("keep_alive_s = 30", "keep_alive_s = 'x'"),
     "[[models]] entry 2 ('code') keep_alive_s: expected a number, got 'x'"),
    (TWO.replace('path = "b.gguf"\n', ''), "[[models]] entry 2 ('code'): path is required"),
    (TWO.replace('slots = 4', 'slot = 4'),
     "[[models]] entry 1 ('chat'): unknown key slot (known: name, path, n_ctx, n_gpu_layers, "
     "cache_type_k, cache_type_v, flash_attn, workers, slots, threads, load, keep_alive_s, "
     "speculative, spec_max_draft, draft)"),
    (TWO.replace('name = "chat"', 'name = "a chat"'),
     "[[models]] entry 1 ('a chat') name: 'a chat' is not a valid name (letters, digits and "
     "._:/- ; it starts with a letter or digit)"),
    (TWO + "[model]\nn_ctx = 512\n",
     "[model] n_ctx is set per model when [[models]] is given: set it in each [[models]] "
     "entry instead"),
    (TWO + "[workers]\nslots = 2\n",
     "[workers] slots is set per model when [[models]] is given: set it in each [[models]] "
     "entry instead"),
    ("models = 3\n", "[[models]] must be an array of tables ([[models]] entries)"),
    ("[host]\nram_budget_mb = -1\n", "[host] ram_budget_mb: -1 is out of range [0, 16777216]"),
])
def test_errors_name_the_entry_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        config.load(path)
    assert str(exc.value) == f"{path}: {message}"


def test_shared_keys_stay_in_their_sections(tmp_path):
    cfg = config.load(write(tmp_path, TWO + "[model]\nn_batch = 32\n[workers]\nprompt_cache_mib = 0\n"
                                            "[host]\nram_budget_mb = 300\n"))
    w = cfg.for_model(cfg.served[1])
    assert w.model.n_batch == 32 and w.workers.prompt_cache_mib == 0
    assert cfg.host.ram_budget_mb == 300


def test_reference_documents_the_entry_keys():
    keys = {key: (default, doc) for sec, key, default, doc in config_explain.reference(Config)
            if sec == "[models]"}
    assert list(keys) == ["name", "path", "n_ctx", "n_gpu_layers", "cache_type_k",
                          "cache_type_v", "flash_attn", "workers", "slots", "threads", "load",
                          "keep_alive_s", "speculative", "spec_max_draft", "draft"]
    assert keys["name"][0] is None and keys["path"][0] is None      # required
    assert all(doc for _, doc in keys.values())
