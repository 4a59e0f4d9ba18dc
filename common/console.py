"""The console the command-line tools print their tables and reports to.

At a terminal it is rich's own: as wide as the terminal, in colour.  Written to a pipe
or a file the output has no width to fit: rich is given one that no table or line
reaches, so a table keeps its columns at their natural width and no line is wrapped or
cut; there is no colour either (rich writes none where there is no terminal).
"""
from __future__ import annotations

from typing import IO

from rich.console import Console

PIPE_WIDTH = 10_000       # columns: wider than any line the tools print


def console(file: IO[str] | None = None, stderr: bool = False) -> Console:
    """A console on ``file`` (default stdout, or stderr), wide as above."""
    c = Console(file=file, stderr=stderr)
    return c if c.is_terminal else Console(file=file, stderr=stderr, width=PIPE_WIDTH)
