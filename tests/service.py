"""Start and stop a real llmctl (supervisor, gateway, workers, real model) for tests."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from llmctl.common.sync_client import Client
from llmctl.tools.service_status import free_port, toml_text

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_B = ROOT / "models" / "SmolLM2-135M-Instruct.Q8_0.gguf"   # tools/requantize.py


def wait_until(cond, timeout: float, what: str) -> None:
    """Poll a condition (not a sleep as synchronisation: it returns as soon as it holds)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# What a server log must never hold: an exception escaped somewhere (a request made the
# server raise), or a state changed in a way its table does not allow (control/states.py).  Every test service's logs are scanned when it stops.
LOG_PROBLEMS = ("Traceback (most recent call last)", "Task exception was never retrieved",
                "Exception in callback", "illegal state transition")


class Service:
    def __init__(self, allow_tracebacks: bool = False, **sections: dict[str, Any]) -> None:
        assert MODEL.is_file(), f"the model is missing: run `make setup` ({MODEL})"
        self.allow_tracebacks = allow_tracebacks
        # A short directory: ipc:// socket paths must stay under ~100 characters.
        self.dir = Path(tempfile.mkdtemp(prefix="llmctl-"))
        self.port = free_port()
        self.http_port = free_port()
        base: dict[str, dict[str, Any]] = {
            "model": {"path": str(MODEL), "n_ctx": 1024, "threads": 1},
            # A 5 s liveness bound, the product's default: a worker on a busy machine may
            # take seconds for a step. Tests of liveness itself set a tighter one.
            "workers": {"count": 1, "slots": 1, "heartbeat_interval_s": 0.5, "liveness": 10},
            "gateway": {"port": self.port, "handshake_timeout_s": 1.0},
            "http": {"port": self.http_port},
            "control": {"run_dir": str(self.dir / "run"), "start_timeout_s": 120.0,
                        "drain_timeout_s": 10.0, "stop_timeout_s": 3.0},
        }
        models: list[dict[str, Any]] = sections.pop("models", [])   # [[models]] entries
        tenants: list[dict[str, Any]] = sections.pop("tenants", [])  # [[tenants]] entries
        if models:           # the per-model keys move into the entries
            for key in ("path", "n_ctx", "threads"):
                base["model"].pop(key)
            for key in ("count", "slots"):
                base["workers"].pop(key)
        for name, values in sections.items():
            base.setdefault(name, {}).update(values)
        self.config = self.dir / "config.toml"
        self.config.write_text(toml_text({**base, "models": models, "tenants": tenants}))
        self.pids: set[int] = set()

    def llmctl(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "llmctl.control", *args, "-c", str(self.config)],
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)

    def start(self) -> subprocess.CompletedProcess:
        r = self.llmctl("start")
        if r.returncode == 0:
            self.remember_pids()
        return r

    def status(self) -> dict[str, Any]:
        r = self.llmctl("status", "--json")
        st = json.loads(r.stdout)
        st["exit_code"] = r.returncode
        return st

    def remember_pids(self) -> None:
        st = self.status()
        if st.get("running"):
            self.pids |= {p for p in [st["pid"], st["gateway"]["pid"],
                                      *(w["pid"] for w in st["workers"])] if p}

    def client(self, hello: bool = True, timeout: float = 60.0) -> Client:
        c = Client("127.0.0.1", self.port, timeout=timeout)
        if hello:
            c.hello()
        return c

    def counters(self) -> dict[str, int]:
        return self.status()["gateway"]["counters"]

    def idle(self) -> bool:
        st = self.status()
        gw = st["gateway"]
        return gw["inflight"] == 0 and gw["queue"] == 0 and gw.get("parked", 0) == 0 and all(
            w["inflight"] == 0 for w in st["workers"])

    def log_problems(self) -> list[str]:
        """Log lines (with the file and two lines of context) that show an exception."""
        out = []
        for path in sorted((self.dir / "run" / "logs").glob("*")):
            lines = path.read_text(errors="replace").splitlines()
            for i, line in enumerate(lines):
                if any(p in line for p in LOG_PROBLEMS):
                    out.append(f"{path.name}:{i + 1}: " + " | ".join(lines[max(0, i - 1):i + 8]))
        return out

    def stop(self) -> subprocess.CompletedProcess:
        """Stop the service; fail (keeping its directory) if a log shows an exception."""
        if self.pids:
            try:
                self.remember_pids()
            except (ValueError, KeyError, subprocess.TimeoutExpired):
                pass
        r = self.llmctl("stop")
        for pid in self.pids:   # whatever a failed test left behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        problems = [] if self.allow_tracebacks else self.log_problems()
        if r.returncode == 0 and not problems and os.environ.get("LLMCTL_KEEP_TEST_DIRS") != "1":
            shutil.rmtree(self.dir, ignore_errors=True)
        assert not problems, f"the service logged exceptions (kept in {self.dir}):\n" + \
            "\n".join(problems)
        return r


class NodeService(Service):
    """`llmctl start` of a node ([node] join), run behind ``prefix`` (``ip netns exec NS``
    puts it on the other side of a network boundary; empty: this namespace)."""

    def __init__(self, prefix: list[str], **sections: dict[str, Any]) -> None:
        super().__init__(**sections)
        self.prefix = prefix

    def llmctl(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run([*self.prefix, sys.executable, "-m", "llmctl.control", *args,
                               "-c", str(self.config)], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)

    def worker(self) -> dict[str, Any]:
        return self.status()["workers"][0]


@contextlib.contextmanager
def running(s: Service) -> Iterator[Service]:
    """``s`` started (or the test fails with its output), with ``s.base`` the URL of its
    HTTP front; stopped afterwards."""
    try:
        r = s.start()
        assert r.returncode == 0, r.stdout + r.stderr
        [addr] = s.status()["gateway"]["http_listening"]
        s.base = f"http://{addr}"
        yield s
    finally:
        s.stop()


def http_service(n_ctx: int, **workers: Any) -> Iterator[Service]:
    """A running service with its HTTP front, two slots and no deep probes (a fixture's
    body: ``yield from``); ``workers`` adds to its [workers] section."""
    s = Service(model={"n_ctx": n_ctx},
                workers={"slots": 2, "probe_interval_s": 0.0, **workers},
                http={"enabled": True, "port": free_port()})
    with running(s):
        yield s


def openai_client(svc: Service, timeout: float) -> Iterator[Any]:
    """An ``openai.OpenAI`` client of ``svc`` (a fixture's body: ``yield from``); when the
    test is done, every request it made has ended."""
    import openai
    c = openai.OpenAI(base_url=f"{svc.base}/v1", api_key="none", max_retries=0, timeout=timeout)
    try:
        yield c
    finally:
        c.close()
    wait_until(svc.idle, 30, "every request ended")
