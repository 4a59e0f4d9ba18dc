"""Config: one frozen typed tree, errors that name the file, section and key."""
from __future__ import annotations

import json
import math
from pathlib import Path

import msgspec
import pytest

from llmctl.common import config, config_explain
from llmctl.common.config import Config, ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_repo_config_is_valid_and_matches_documented_defaults():
    cfg = config.load(Path(__file__).parent.parent / "config.toml")
    assert cfg.gateway.host == "127.0.0.1" and cfg.gateway.port == 8080
    assert cfg.control.run_dir.endswith(".llmctl") and Path(cfg.control.run_dir).is_absolute()
    assert cfg.model.path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def test_defaults_and_relative_paths(tmp_path):
    cfg = config.load(write(tmp_path, '[model]\npath = "m.gguf"\n'))
    assert cfg.model.path == str(tmp_path / "m.gguf")
    assert cfg.control.run_dir == str(tmp_path / ".llmctl")
    assert cfg.gateway.max_frame == 1 << 20 and cfg.gateway.handshake_timeout_s == 5.0
    assert cfg.http.port == 8081 and cfg.http.enabled is False


def test_frozen():
    with pytest.raises(AttributeError):
        Config().gateway.port = 1  # type: ignore[misc]


@pytest.mark.parametrize("text, fragment", [
    ("[gateway]\nport = 70000\n", "[gateway] port: 70000 is out of range"),
    ("[gateway]\nprot = 1\n", "unknown key [gateway] prot"),
    ("[gatway]\n", "unknown section [gatway]"),
    ("[workers]\ncount = 0\n", "[workers] count"),
    ("[workers]\ncount = 1.5\n", "[workers] count: expected an integer"),
    ("[http]\nenabled = 1\n", "[http] enabled: expected true or false"),
    ("[model]\nthreads = true\n", "[model] threads: expected an integer"),
    ("[generation]\ndeadline_ms = 9\nmax_deadline_ms = 5\n", "deadline_ms (9) exceeds"),
    ("[gateway\n", "invalid TOML"),
    ("model = 3\n", "[model] must be a table"),
])
def test_errors_name_the_file_and_key(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        config.load(path)
    assert fragment in str(exc.value)
    assert str(path) in str(exc.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        config.load(tmp_path / "nope.toml")


def test_float_accepts_integers(tmp_path):
    cfg = config.load(write(tmp_path, "[gateway]\nhandshake_timeout_s = 2\n"))
    assert cfg.gateway.handshake_timeout_s == 2.0 and isinstance(cfg.gateway.handshake_timeout_s, float)


def test_json_round_trip_revalidates(tmp_path):
    cfg = config.load(write(tmp_path, "[workers]\ncount = 3\n"))
    again = Config.from_json(cfg.to_json())
    assert again.workers == cfg.workers and again.model == cfg.model
    bad = cfg.to_json().replace('"count": 3', '"count": 0')
    with pytest.raises(ConfigError, match=r"\[workers\] count"):
        Config.from_json(bad)


def test_readme_config_reference_is_current():
    from llmctl.tools import config_doc
    text = config_doc.README.read_text()
    assert config_doc.updated(text) == text, "run `python -m llmctl.tools.config_doc`"
    for _, key, _, _ in config_explain.reference(Config):
        assert f"`{key}`" in text


# ---- what msgspec does for the tree --------------------------------------------------------

SECTIONS = [f.name for f in msgspec.structs.fields(Config)
            if f.name not in ("source", "models", "tenants")]
KEYS = [(sec, key, default, doc) for sec, key, default, doc in config_explain.reference(Config)
        if sec not in ("[models]", "[tenants]")]   # the arrays' entries: tested below


def keys_of(section: str) -> list[str]:
    return [key for sec, key, _, _ in config_explain.reference(Config) if sec == section]


def test_every_section_is_a_frozen_strict_keyword_only_struct():
    assert SECTIONS == ["model", "workers", "generation", "gateway", "http", "control", "gpu",
                        "synthetic", "cluster", "node", "host", "scheduling"]
    cfg = Config()
    for part in [cfg, *(getattr(cfg, name) for name in SECTIONS)]:
        conf = type(part).__struct_config__
        assert conf.frozen and conf.forbid_unknown_fields, type(part)
        first = msgspec.structs.fields(part)[0].name
        with pytest.raises(AttributeError):
            setattr(part, first, getattr(part, first))
        with pytest.raises(TypeError):                  # kw_only
            type(part)(getattr(part, first))


@pytest.mark.parametrize("section", SECTIONS)
def test_unknown_key_in_every_section(tmp_path, section):
    path = write(tmp_path, f"[{section}]\nnope = 1\n")
    with pytest.raises(ConfigError) as exc:
        config.load(path)
    assert str(exc.value) == (f"{path}: unknown key [{section}] nope "
                              f"(known: {', '.join(keys_of(section))})")


def test_exact_messages(tmp_path):
    cases = {
        "[model]\nn_ctx = 32\n": "[model] n_ctx: 32 is out of range [64, 1048576]",
        "[model]\nn_ctx = 'x'\n": "[model] n_ctx: expected an integer, got 'x'",
        "[workers]\nheartbeat_interval_s = 100\n":
            "[workers] heartbeat_interval_s: 100.0 is out of range [0.05, 60.0]",
        "[workers]\nheartbeat_interval_s = nan\n":
            "[workers] heartbeat_interval_s: nan is out of range [0.05, 60.0]",
        "[model]\ncache_type_k = 'q3_K'\n": "[model] cache_type_k: 'q3_K' is not one of f16, "
                                           "bf16, f32, q8_0, q5_1, q5_0, q4_1, q4_0",
        "[model]\ncache_type_v = 3\n": "[model] cache_type_v: expected a string, got 3",
        "[model]\nflash_attn = true\n": "[model] flash_attn: expected a string, got True",
        "[model]\ncache_type_v = 'q8_0'\nflash_attn = 'off'\n":
            "[model] cache_type_v = 'q8_0' with flash_attn = 'off': llama.cpp needs flash "
            "attention for a quantized V cache; set flash_attn = 'auto' or 'on', or "
            "cache_type_v = 'f16'",
        "[[models]]\nname = 'a'\npath = 'a.gguf'\n[[models]]\nname = 'b'\npath = 'b.gguf'\n"
        "cache_type_v = 'q4_0'\nflash_attn = 'off'\n":
            "[[models]] entry 2 ('b') cache_type_v = 'q4_0' with flash_attn = 'off': llama.cpp "
            "needs flash attention for a quantized V cache; set flash_attn = 'auto' or 'on', "
            "or cache_type_v = 'f16'",
        "[gateway]\nport = 99999999999999999999\n":
            "[gateway] port: 99999999999999999999 is out of range [0, 65535]",
        "[[model]]\n": "[model] must be a table",
        "source = 'x'\n": "unknown section [source] (known: " + ", ".join(SECTIONS)
                          + ", [[models]], [[tenants]])",
        "x = 1\n": "unknown section [x] (known: " + ", ".join(SECTIONS)
                    + ", [[models]], [[tenants]])",
    }
    for text, message in cases.items():
        path = write(tmp_path, text)
        with pytest.raises(ConfigError) as exc:
            config.load(path)
        assert str(exc.value) == f"{path}: {message}", text


WRONG = {bool: ("'yes'", "expected true or false, got 'yes'"),
         int: ("1.5", "expected an integer, got 1.5"),
         float: ("'x'", "expected a number, got 'x'"),
         str: ("[1]", "expected a string, got [1]")}


def test_a_wrong_type_in_any_nested_key_names_section_and_key(tmp_path):
    for section, key, default, _ in KEYS:
        value, message = WRONG[type(default)]
        path = write(tmp_path, f"[{section}]\n{key} = {value}\n")
        with pytest.raises(ConfigError) as exc:
            config.load(path)
        assert str(exc.value) == f"{path}: [{section}] {key}: {message}"


def test_every_range_bound_is_enforced_as_written():
    """msgspec enforces exactly the [lo, hi] that the messages (and _keys) report."""
    cfg = Config()
    for section, key, _, _ in KEYS:
        k, typ = config_explain.keys(Config)[section][key], type(getattr(cfg, section))
        if k.lo is None:
            continue
        for inside in (k.lo, k.hi):
            assert getattr(msgspec.convert({key: inside}, typ), key) == inside
        below, above = (k.lo - 1, k.hi + 1) if k.kind is int else \
            (math.nextafter(k.lo, -math.inf), math.nextafter(k.hi, math.inf))
        for outside in (below, above):
            with pytest.raises(ConfigError) as exc:
                Config.from_json(json.dumps({section: {key: outside}}))
            assert str(exc.value) == f"<json>: [{section}] {key}: {outside!r} is out of range " \
                                     f"[{k.lo}, {k.hi}]"


def test_round_trip_to_json_from_json_equals_the_original(tmp_path):
    cfg = config.load(write(tmp_path, """
[model]
path = "m.gguf"
n_ctx = 4096
[workers]
count = 3
prompt_cache = false
heartbeat_interval_s = 2
[generation]
temperature = 0.0
[gateway]
token = "s3cr\u00e9t \\\" quoted"
[http]
enabled = true
port = 0
[control]
run_dir = "run"
backoff_max_s = 60
[gpu]
fit = true
on_breach = "restart_largest"
[synthetic]
step_ms = 2.0
[cluster]
bind = "tcp://127.0.0.1:5555"
allow_insecure = true
[node]
name = "gpu1"
"""))
    assert all(getattr(cfg, name) != getattr(Config(), name) for name in SECTIONS
               if name not in ("synthetic", "host", "scheduling"))
    again = Config.from_json(cfg.to_json())
    assert again == cfg and again.source == str(tmp_path / "c.toml")
    assert isinstance(again.workers.heartbeat_interval_s, float)
    assert Config.from_json(Config().to_json()) == msgspec.structs.replace(Config(), source="<json>")


def test_from_json_errors_are_config_errors():
    with pytest.raises(ConfigError, match="<json>: invalid JSON"):
        Config.from_json("{not json")
    with pytest.raises(ConfigError, match="<json>: expected a table at the top level"):
        Config.from_json("[1, 2]")
    with pytest.raises(ConfigError, match=r"<json>: unknown key \[http\] prot"):
        Config.from_json('{"http": {"prot": 1}}')


def test_choices_are_the_estimators_vocabulary():
    assert config.ON_BREACH == ("alert", "restart_largest")
    for key in ("cache_type_k", "cache_type_v"):
        assert config_explain.keys(Config)["model"][key].choices == tuple(config.KV_TYPES)
    assert config_explain.keys(Config)["gpu"]["on_breach"].choices == config.ON_BREACH


def test_replace_and_fields_work_on_the_tree():
    cfg = Config()
    new = msgspec.structs.replace(cfg, workers=msgspec.structs.replace(cfg.workers, count=2))
    assert new.workers.count == 2 and cfg.workers.count == 1 and new.model is cfg.model
    assert [f.name for f in msgspec.structs.fields(cfg.workers)] == keys_of("workers")
