"""`llmctl top`: a live dashboard of the service (rich Live, 80x24, q or Ctrl-C quits).

``run()`` asks the supervisor for its status once a second and redraws
``render.dashboard`` of it.
"""
from __future__ import annotations

import os
import select
import sys
import termios
import time
import tty
from typing import Any, Callable

from rich.live import Live

from llmctl.control.render import dashboard, not_running


def run(fetch: Callable[[], dict[str, Any] | None], refresh_s: float = 1.0) -> int:
    """Redraw every ``refresh_s`` until q or Ctrl-C."""
    fd = sys.stdin.fileno() if sys.stdin.isatty() else None
    old = termios.tcgetattr(fd) if fd is not None else None
    try:
        if fd is not None:
            tty.setcbreak(fd)
        with Live(not_running(), auto_refresh=False, screen=False) as live:
            while True:
                st = fetch()
                live.update(dashboard(st) if st else not_running(), refresh=True)
                deadline = time.monotonic() + refresh_s
                while (left := deadline - time.monotonic()) > 0:
                    if fd is None:
                        time.sleep(left)
                        break
                    ready, _, _ = select.select([fd], [], [], left)
                    if ready and os.read(fd, 32).lower().startswith(b"q"):
                        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if fd is not None and old is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, old)
