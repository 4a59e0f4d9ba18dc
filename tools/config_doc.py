"""Regenerate the configuration reference in README.md from the config tree's annotations.

    python -m llmctl.tools.config_doc          # rewrite README.md between the markers
    python -m llmctl.tools.config_doc --check  # exit 1 if README.md is out of date
"""
from __future__ import annotations

import sys
from pathlib import Path

from llmctl.common.config import Config
from llmctl.common.config_explain import reference

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def render() -> str:
    out, section = [], None
    for sec, key, default, doc in reference(Config):
        if sec != section:
            out += ["", f"**[{sec}]**", "", "| key | default | meaning |", "|---|---|---|"]
            section = sec
        value = str(default).lower() if isinstance(default, bool) else repr(default).replace("'", '"')
        value = "required" if default is None else f"`{value}`"
        out.append(f"| `{key}` | {value} | {doc} |")
    return "\n".join(out) + "\n"


def updated(text: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{render()}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = README.read_text()
    new = updated(text)
    if "--check" in argv:
        return 0 if new == text else 1
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
