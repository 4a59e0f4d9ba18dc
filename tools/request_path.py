"""Which project files one request passes through, measured on a real service.

    python -m llmctl.tools.request_path [-c config.toml] [--kinds tcp,http,cc50] [--json [PATH]]

Starts llmctl (the default model, or ``-c``'s config; on free ports, deep probes off, a
temporary run directory, stopped at the end) with the tracing hook of
``tools/call_trace.py`` in every Python process of the service: the supervisor, the
gateway and the workers.  Each process records which functions of ``common/``,
``control/``, ``dataplane/`` and ``worker/`` it calls or resumes within a window.

After one request of each kind (a warm-up: imports and first-use code do not count), per
kind it records

* (b) a window holding exactly one request, from before it connects until ``--settle``
  seconds after it has ended (at least ``--min-window`` seconds), then
* (a) an idle window of the same length, no request (the gateway's counters, read between
  the windows, must show one request done in (b) and nothing in (a), or the tool fails);

and reports, per process and in total (distinct files over the processes), each with its
line count:

* **raw**: the files called in (b);
* **request's files**: raw minus the files called in (a): what the request adds to an
  idle service;
* **with a new function**: the files of the functions called in (b) and not in (a): also
  the files the idle service uses too (heartbeats, the worker's loop) where the request
  calls functions of their own.

A function counts when it is called or resumed (a coroutine, a generator) within the
window; a loop that was already running when the window opened (the worker's) counts by
the functions it calls.  The hook slows the service (a Python call per function call): the
tool counts files, it times nothing.

Kinds: ``tcp`` one GENERATE on the binary port (``common/sync_client.py``: connect, HELLO,
GENERATE, frames to DONE), ``http`` one streaming OpenAI chat completion, ``cc50`` one CC50
``REQ_INFER`` (``common/cc50.py``) on the binary port.
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from llmctl.common import cc50
from llmctl.common.client import ServerError
from llmctl.common.config import ConfigError, load
from llmctl.common.sync_client import Client
from llmctl.tools import call_trace
from llmctl.tools.request_path_report import Fn, compare, print_report, report_json
from llmctl.tools.service_status import free_port, gateway_address, status, toml_text

ROOT = Path(__file__).resolve().parent.parent      # common/, control/, ... are below it
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Once upon a time"
MAX_TOKENS = 8
TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    http_host: str
    http_port: int
    token: str | None
    api_key: str


def tcp_generate(t: Target) -> None:
    with Client(t.host, t.port, timeout=TIMEOUT_S) as c:
        c.hello(t.token)
        res = c.complete(1, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0.0)
    if res.done is None:
        raise RuntimeError(f"the GENERATE did not end with DONE: {res.error}")


def http_stream(t: Target) -> None:
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS,
            "temperature": 0.0, "stream": True}
    headers = {"Content-Type": "application/json"}
    if t.api_key:
        headers["Authorization"] = f"Bearer {t.api_key}"
    conn = http.client.HTTPConnection(t.http_host, t.http_port, timeout=TIMEOUT_S)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    if resp.status != 200 or b"data: [DONE]" not in data:
        raise RuntimeError(f"the chat completion failed: {resp.status} {data[:300]!r}")


def cc50_infer(t: Target) -> None:
    async def one() -> cc50.Answer:
        c = await cc50.Client(t.host, t.port).connect()
        try:
            _, ans = c.submit(PROMPT, max_tokens=MAX_TOKENS)
            await asyncio.wait_for(ans.done.wait(), TIMEOUT_S)
            return ans
        finally:
            await c.close()
    ans = asyncio.run(one())
    if ans.error is not None:
        raise RuntimeError(f"the CC50 request failed: {ans.error}")


KINDS: dict[str, tuple[str, Callable[[Target], None]]] = {
    "tcp": ("one GENERATE on the binary port", tcp_generate),
    "http": ("one streaming OpenAI chat completion", http_stream),
    "cc50": ("one CC50 REQ_INFER on the binary port", cc50_infer),
}


# ---- the service's config ---------------------------------------------------------------

def service_config(path: str | None, run_dir: Path) -> dict[str, Any]:
    """The tree of ``path`` (its relative paths made absolute) or the default model's,
    with what the measurement needs: free ports, HTTP on, deep probes off (a probe is a
    request: none may fall into a window), ``run_dir``."""
    if path is None:
        raw: dict[str, Any] = {"model": {"path": str(MODEL)}, "workers": {"count": 1}}
    else:
        cfg = load(path)
        if cfg.is_node or cfg.cluster.bind:
            raise ConfigError(f"{path}: a node or a cluster head: measure a single machine")
        with open(path, "rb") as f:
            raw = tomllib.load(f)
        if cfg.models:
            for entry, resolved in zip(raw["models"], cfg.models):
                entry["path"] = resolved.path
        else:
            raw.setdefault("model", {})["path"] = cfg.model.path
        if cfg.scheduling.keys_file:
            raw["scheduling"]["keys_file"] = cfg.scheduling.keys_file
    raw.setdefault("gateway", {})["port"] = free_port()
    raw.setdefault("http", {}).update(enabled=True, port=free_port())
    raw.setdefault("workers", {})["probe_interval_s"] = 0.0
    raw.setdefault("control", {})["run_dir"] = str(run_dir)
    return raw


# ---- the traced service -----------------------------------------------------------------

class TracedService:
    """llmctl with the tracing hook in its processes, and the windows it records."""

    def __init__(self, config: str | None, min_window_s: float, settle_s: float) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="llmctl-path-"))
        self.trace = self.dir / "trace"
        self.trace.mkdir()
        hook = self.dir / "hook"
        hook.mkdir()
        shutil.copyfile(call_trace.__file__, hook / "sitecustomize.py")
        self.config = str(self.dir / "config.toml")
        try:
            Path(self.config).write_text(toml_text(service_config(config, self.dir / "run")))
            self.cfg = load(self.config)
        except ConfigError:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        path = [str(hook), *filter(None, [os.environ.get("PYTHONPATH")])]
        self.env = dict(os.environ, **{"PYTHONPATH": os.pathsep.join(path),
                                       call_trace.TRACE_DIR_ENV: str(self.trace),
                                       call_trace.ROOT_ENV: str(ROOT)})
        self.min_window_s, self.settle_s = min_window_s, settle_s
        self.procs: dict[int, str] = {}         # pid -> process name
        self.pids: set[int] = set()             # every pid seen, killed at the end

    def llmctl(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "llmctl.control", *args, "-c", self.config],
                              capture_output=True, text=True, timeout=600, env=env)

    def start(self) -> None:
        r = self.llmctl("start", env=self.env)
        if r.returncode != 0:
            raise RuntimeError(f"llmctl start failed:\n{r.stdout}{r.stderr}")
        self.learn_processes()

    def learn_processes(self) -> None:
        st = status(self.config)
        if not st.get("running"):
            raise RuntimeError(f"llmctl is not running ({self.config})")
        workers = st["workers"]
        self.procs = {st["pid"]: "control", st["gateway"]["pid"]: "dataplane"}
        for w in workers:
            if w.get("pid"):
                self.procs[w["pid"]] = "worker" if len(workers) == 1 else f"worker {w['id']}"
        self.pids |= set(self.procs)

    def target(self) -> Target:
        st = status(self.config)
        host, port = gateway_address(st)
        http_host, http_port = st["gateway"]["http_listening"][0].rsplit(":", 1)
        return Target(host, port, http_host, int(http_port), self.cfg.gateway.token or None,
                      os.environ.get("LLMCTL_API_KEY") or self.cfg.http.api_key)

    def quiet_counters(self) -> dict[str, int]:
        """The gateway's counters once nothing is in flight (asked outside any window)."""
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            st = status(self.config)
            gw = st["gateway"]
            if gw["inflight"] == 0 and gw["queue"] == 0 and not gw.get("parked") and all(
                    w["inflight"] == 0 for w in st["workers"]):
                return gw["counters"]
            if time.monotonic() > deadline:
                raise RuntimeError("the service did not become idle")
            time.sleep(0.05)

    def _control(self, label: str) -> None:
        tmp = self.trace / "window.tmp"
        tmp.write_text(label)
        os.replace(tmp, self.trace / call_trace.CONTROL_FILE)

    def _answers(self, label: str, suffix: str) -> dict[int, Path]:
        deadline = time.monotonic() + 60
        while True:
            found = {pid: self.trace / f"{label}.{pid}.{suffix}" for pid in self.procs}
            missing = [f"{self.procs[p]} (pid {p})" for p, f in found.items() if not f.exists()]
            if not missing:
                return found
            if time.monotonic() > deadline:
                raise RuntimeError(f"no answer from the tracing hook of {', '.join(missing)}: "
                                   "did its environment reach it?")
            time.sleep(0.01)

    def window(self, label: str, body: Callable[[], None] | None,
               length_s: float | None = None) -> tuple[dict[str, set[Fn]], float, float]:
        """Open a window in every process, run ``body``, close it after ``length_s``
        (default: ``settle_s`` after the body, at least ``min_window_s``); (each process's
        functions, the window's length, the body's time)."""
        self._control(label)
        self._answers(label, "on")
        t0 = time.monotonic()
        if body is not None:
            body()
        took = time.monotonic() - t0
        if length_s is None:
            length_s = max(self.min_window_s, took + self.settle_s)
        time.sleep(max(0.0, t0 + length_s - time.monotonic()))
        self._control("")
        out = {}
        for pid, path in self._answers(label, "json").items():
            out[self.procs[pid]] = {tuple(f) for f in json.loads(path.read_text())["functions"]}
        return out, length_s, took

    def stop(self, keep: bool) -> None:
        try:
            self.learn_processes()
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        self.llmctl("stop")
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)


def changed(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def measure(svc: TracedService, kinds: list[str]) -> dict[str, Any]:
    """Per kind: its title, window lengths and each process's comparison of (b) with (a)."""
    t = svc.target()
    for kind in kinds:                           # the warm-up
        KINDS[kind][1](t)
    svc.quiet_counters()
    svc.learn_processes()                        # workers loaded on demand are up now
    out: dict[str, Any] = {}
    for kind in kinds:
        title, run = KINDS[kind]
        c0 = svc.quiet_counters()
        request, length, took = svc.window(f"{kind}-request", lambda: run(t))
        c1 = svc.quiet_counters()
        idle, _, _ = svc.window(f"{kind}-idle", None, length)
        c2 = svc.quiet_counters()
        if changed(c0, c1).get("done") != 1 or changed(c0, c1).get("probes") or changed(c1, c2):
            raise RuntimeError(f"{kind}: the windows do not hold one request and none: "
                               f"{changed(c0, c1)}, then {changed(c1, c2)}")
        out[kind] = {"title": title, "window_s": round(length, 3), "request_s": round(took, 3),
                     "processes": {name: compare(request[name], idle[name])
                                   for name in sorted(request)}}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmctl.tools.request_path",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("-c", "--config", default=None,
                    help="the service's config (default: the default model, one worker)")
    ap.add_argument("--kinds", default=",".join(KINDS),
                    help=f"requests to measure, comma-separated, of {', '.join(KINDS)}")
    ap.add_argument("--min-window", type=float, default=2.0, metavar="S",
                    help="shortest window in seconds (idle work such as heartbeats falls "
                         "into both windows)")
    ap.add_argument("--settle", type=float, default=0.5, metavar="S",
                    help="seconds a window stays open after its request has ended")
    ap.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                    help="write the result as JSON to PATH (alone: to stdout, no table)")
    ap.add_argument("--keep", action="store_true", help="keep the run and trace directory")
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or any(k not in KINDS for k in kinds):
        ap.error(f"--kinds: choose from {', '.join(KINDS)}")
    try:
        svc = TracedService(args.config, args.min_window, args.settle)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        svc.start()
        result = measure(svc, kinds)
    except (OSError, RuntimeError, ServerError, http.client.HTTPException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        svc.stop(args.keep)
    doc = report_json(result, ROOT)
    if args.json == "-":
        print(json.dumps(doc, indent=2))
        return 0
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    print_report(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
