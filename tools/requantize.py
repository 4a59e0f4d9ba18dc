"""Make the second real model of the multi-model tests from the default one, locally.

llama.cpp's quantize API, as llama-cpp-python exposes it (``llama_model_quantize``),
re-quantises the default GGUF (Q4_1) to Q8_0: a different file of a different size
(about 1.5x), the same tokenizer and chat template.  Nothing is downloaded.  Idempotent:
an existing output that llama.cpp can read is kept.

    python -m llmctl.tools.requantize [--src models/SmolLM2-135M-Instruct.Q4_1.gguf]
                                      [--dest models/SmolLM2-135M-Instruct.Q8_0.gguf]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

MODELS = Path(__file__).resolve().parent.parent / "models"
DEFAULT_SRC = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DEST = MODELS / "SmolLM2-135M-Instruct.Q8_0.gguf"
FTYPES = ("Q8_0", "Q4_0", "Q5_0", "Q5_1")


def _readable(path: Path) -> bool:
    """Does the file parse as a GGUF (header and tensor table)?"""
    try:
        from gguf import GGUFReader
        GGUFReader(str(path))
        return True
    except Exception:       # a truncated or foreign file: make it again
        return False


def requantize(src: Path, dest: Path, ftype: str = "Q8_0", threads: int = 0) -> Path:
    if dest.is_file() and _readable(dest):
        log.info("second model already present: %s", dest)
        return dest
    if not src.is_file():
        raise RuntimeError(f"the source model is missing: {src} (run fetch_model first)")
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True          # the source is already quantised
    params.nthread = threads or (os.cpu_count() or 1)
    part = dest.with_suffix(".part")
    log.info("re-quantising %s to %s -> %s", src.name, ftype, dest.name)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(part).encode(), params)
    if rc != 0 or not _readable(part):
        part.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize failed (rc={rc})")
    part.replace(dest)
    log.info("second model ready: %s (%.1f MiB)", dest, dest.stat().st_size / 2 ** 20)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmctl.tools.requantize")
    ap.add_argument("--src", type=Path, default=DEFAULT_SRC)
    ap.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    ap.add_argument("--ftype", choices=FTYPES, default="Q8_0")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        requantize(args.src, args.dest, args.ftype)
    except RuntimeError as exc:
        log.error("cannot make the second model: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
