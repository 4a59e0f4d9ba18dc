"""Config: one frozen typed tree, errors that name the file, section and key."""
from __future__ import annotations

from pathlib import Path

import pytest

from llmctl.common import config
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
    for _, key, _, _ in config.reference():
        assert f"`{key}`" in text
