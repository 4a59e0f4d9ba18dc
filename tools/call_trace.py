"""The tracing hook of ``tools/request_path.py``: which project functions a process calls
within a window.

``request_path`` copies this file as ``sitecustomize.py`` into a directory that it puts
first on the service's ``PYTHONPATH``, so that every Python process of the service (the
supervisor, the gateway, the workers: each inherits its parent's environment) runs
``install()`` before its own code.  The hook imports the standard library only.

In each process a profile function (``sys.setprofile`` and ``threading.setprofile``: the
main thread and every thread started later) records the code object of each Python
function called or resumed while a window is open.  Windows are driven by one control
file, ``window`` in ``$LLMCTL_TRACE_DIR``, which a thread of the hook polls:

* a label in it opens a window: the process forgets what it recorded and writes
  ``LABEL.PID.on``;
* an empty file closes it: the process writes ``LABEL.PID.json``, the functions of the
  service's packages (``common/``, ``control/``, ``dataplane/``, ``worker/`` under
  ``$LLMCTL_TRACE_ROOT``) called in the window, each as ``[file, first line, qualname]``.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Iterable

TRACE_DIR_ENV = "LLMCTL_TRACE_DIR"
ROOT_ENV = "LLMCTL_TRACE_ROOT"
CONTROL_FILE = "window"
PACKAGES = ("common", "control", "dataplane", "worker")
POLL_S = 0.005


def project_file(filename: str, root: str) -> str | None:
    """``dataplane/tcp.py`` for a source file of the service's packages under ``root``;
    None for any other (the standard library, site-packages, tools, tests, ``<frozen>``)."""
    if not filename.endswith(".py"):
        return None
    rel = os.path.relpath(os.path.realpath(filename), os.path.realpath(root))
    parts = rel.split(os.sep)
    if len(parts) < 2 or parts[0] not in PACKAGES:
        return None
    return "/".join(parts)


def functions(codes: Iterable[Any], root: str) -> list[list[Any]]:
    """The project functions among ``codes`` (code objects), sorted, each as
    ``[file, first line, qualname]``."""
    files: dict[str, str | None] = {}
    out = set()
    for code in codes:
        name = code.co_filename
        if name not in files:
            files[name] = project_file(name, root)
        rel = files[name]
        if rel is not None:
            out.add((rel, code.co_firstlineno, getattr(code, "co_qualname", code.co_name)))
    return [list(f) for f in sorted(out)]


class Recorder:
    """One process's record of the window that is open, and the thread that follows the
    control file."""

    def __init__(self, directory: str, root: str) -> None:
        self.dir, self.root = directory, root
        self.on = False
        self.label = ""
        self.codes: set[Any] = set()

    def profile(self, frame: Any, event: str, arg: Any) -> None:
        if self.on and event == "call":
            self.codes.add(frame.f_code)

    def _write(self, name: str, text: str) -> None:
        path = os.path.join(self.dir, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)

    def open(self, label: str) -> None:
        self.codes = set()
        self.label = label
        self.on = True
        self._write(f"{label}.{os.getpid()}.on", "")

    def close(self) -> None:
        self.on = False
        import json                  # here, not at start-up: the hook loads little
        record = {"pid": os.getpid(), "argv": sys.argv, "label": self.label,
                  "functions": functions(list(self.codes), self.root)}
        self._write(f"{self.label}.{os.getpid()}.json", json.dumps(record))

    def poll(self, seen: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        """One look at the control file (``seen``: its identity at the last look): open
        or close a window if it changed; its identity now."""
        path = os.path.join(self.dir, CONTROL_FILE)
        try:
            st = os.stat(path)
            if (st.st_ino, st.st_mtime_ns, st.st_size) == seen:
                return seen
            with open(path) as f:
                label = f.read().strip()
        except OSError:
            return seen
        if self.on and label != self.label:
            self.close()
        if label and not self.on:
            self.open(label)
        return st.st_ino, st.st_mtime_ns, st.st_size

    def follow(self) -> None:
        seen = None
        while True:
            seen = self.poll(seen)
            time.sleep(POLL_S)


def install() -> Recorder | None:
    """Start recording in this process if the environment asks for it."""
    directory, root = os.environ.get(TRACE_DIR_ENV), os.environ.get(ROOT_ENV)
    if not directory or not root:
        return None
    rec = Recorder(directory, root)
    # The thread starts before threading.setprofile: it is not recorded itself.
    threading.Thread(target=rec.follow, name="llmctl-call-trace", daemon=True).start()
    sys.setprofile(rec.profile)
    threading.setprofile(rec.profile)
    return rec


if __name__ == "sitecustomize":
    install()
