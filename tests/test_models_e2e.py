"""Several real models under one memory budget, on the real service.

Model A is the default GGUF (Q4_1), model B the same re-quantised to Q8_0 at set-up
(tools/requantize.py).  With [host] ram_budget_mb = 200 the plan (GGUF estimate) holds
one of them (116 or 161 MiB) but not both: asking for the other evicts the idle one."""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from llmctl.common import admin, config as config_mod
from llmctl.common.protocol import FrameType
from llmctl.control.supervisor_client import call
from tests.service import MODEL, MODEL_B, wait_until

integration = pytest.mark.integration
BUDGET = 200


def two_models(make_service, load: str = "on_demand", **sections: Any):
    assert MODEL_B.is_file(), "the second model is missing: run `make setup` (tools/requantize.py)"
    common = {"n_ctx": 512, "threads": 1, "load": load}
    base: dict[str, Any] = {"workers": {"prompt_cache_mib": 0, "probe_interval_s": 0.0},
                            "host": {"ram_budget_mb": BUDGET}, "http": {"enabled": True}}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return make_service(models=[{"name": "a", "path": str(MODEL), **common},
                                {"name": "b", "path": str(MODEL_B), **common}], **base)


class PlanWatch:
    """Samples `llmctl models` (the control socket) all along: the plan's use of the
    budget at every sample, and every state seen."""

    def __init__(self, svc) -> None:
        self.cfg = config_mod.load(svc.config)
        self.samples: list[list[dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            r = call(self.cfg, admin.Models(), timeout=2.0)
            if r and r.get("ok"):
                self.samples.append(r["models"])
            self._stop.wait(0.1)

    def __enter__(self) -> "PlanWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def now(self) -> dict[str, dict[str, Any]]:
        r = call(self.cfg, admin.Models(), timeout=2.0)
        assert r and r["ok"]
        return {m["name"]: m for m in r["models"]}

    def worst(self) -> float:
        # nothing loads under a budget before the figures are known (need_mib None)
        return max(sum(m["need_mib"] or 0 for m in rows if m["state"] != "unloaded")
                   for rows in self.samples)


def ask(svc, requests: list[dict[str, Any]], then=None) -> dict[int, list[tuple[str, dict]]]:
    """Send GENERATEs on one connection; read until each stream ended, then a PING and
    its PONG: every DONE/ERROR per stream (a second one would show as a second entry)."""
    ends: dict[int, list[tuple[str, dict]]] = {}
    with svc.client(timeout=120.0) as c:
        for i, body in enumerate(requests, 1):
            c.generate(i, **body)
            if then is not None and i == 1:
                then()
        want = set(range(1, len(requests) + 1))
        while not want.issubset({s for s, e in ends.items() if e}):
            f = c.recv_frame()
            if f.type in (FrameType.DONE, FrameType.ERROR):
                kind = "done" if f.type is FrameType.DONE else "error"
                ends.setdefault(f.stream, []).append((kind, json.loads(f.payload)))
        c.ping(b"end")          # frames written before the PONG have arrived by now
        return ends


def model_states(svc) -> dict[str, str]:
    """Each model's state as `llmctl status` shows it."""
    return {m["name"]: m["state"] for m in svc.status()["models"]}


def one(svc, model: str, **kw: Any) -> dict[str, Any]:
    ends = ask(svc, [{"model": model, "prompt": "Once upon a time", "max_tokens": 8,
                      "temperature": 0.0, **kw}])
    (kind, body), = ends[1]
    assert kind == "done", body
    return body


@integration
def test_a_then_b_evicts_a_then_a_evicts_b(make_service):
    svc = two_models(make_service)
    r = svc.start()
    assert r.returncode == 0, r.stderr
    assert "0/0 worker(s) ready" in r.stdout            # on demand: nothing loaded yet
    with PlanWatch(svc) as watch:
        # the plan's figures are read from the GGUFs beside the start
        wait_until(lambda: all(x["need_mib"] is not None for x in watch.now().values()), 60,
                   "the memory plan")
        m = watch.now()
        assert m["a"]["state"] == m["b"]["state"] == "unloaded"
        assert m["a"]["need_mib"] <= BUDGET and m["b"]["need_mib"] <= BUDGET
        assert m["a"]["need_mib"] + m["b"]["need_mib"] > BUDGET       # one fits, not both
        with svc.client() as c:
            assert c.welcome["models"] == ["a", "b"] and c.welcome["model"] == "a"
        a_workers = set(m["a"]["workers"])
        b_workers = set(m["b"]["workers"])

        # A model whose worker has answered is loaded in both views, with no waiting:
        # the supervisor applies the worker's READY before it answers either of them.
        done = one(svc, "a")
        assert done["worker"] in a_workers
        m = watch.now()
        assert m["a"]["state"] == "loaded" and m["b"]["state"] == "unloaded"
        assert m["a"]["workers_ready"] == 1 and m["a"]["measured_mib"] > 0   # RSS of its worker
        assert model_states(svc) == {"a": "loaded", "b": "unloaded"}

        done = one(svc, "b")                               # a is idle: evicted, b loads
        assert done["worker"] in b_workers
        m = watch.now()
        assert m["a"]["state"] == "unloaded" and m["b"]["state"] == "loaded"
        assert m["a"]["evictions"] == 1 and m["b"]["workers_ready"] == 1
        assert model_states(svc) == {"a": "unloaded", "b": "loaded"}

        done = one(svc, None)                              # no model key: the default, a
        assert done["worker"] in a_workers
        m = watch.now()
        assert m["b"]["state"] == "unloaded" and m["b"]["evictions"] == 1
        assert model_states(svc) == {"a": "loaded", "b": "unloaded"}

        # /v1/models lists both with their state; an unknown model is OpenAI's 404
        url = f"http://127.0.0.1:{svc.http_port}/v1"
        listed = json.load(urllib.request.urlopen(f"{url}/models", timeout=10))
        assert [x["id"] for x in listed["data"]] == ["a", "b"]
        req = urllib.request.Request(f"{url}/chat/completions", data=json.dumps(
            {"model": "zz", "messages": [{"role": "user", "content": "hi"}]}).encode(),
            headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(req, timeout=10)
        assert exc.value.code == 404
        assert json.load(exc.value)["error"]["code"] == "model_not_found"
        (kind, body), = ask(svc, [{"model": "zz", "prompt": "x"}])[1]
        assert kind == "error" and body["code"] == "bad_request" and "'zz'" in body["message"]
    assert watch.samples and watch.worst() <= BUDGET


@integration
def test_requests_for_a_while_b_loads_each_end_once(make_service):
    svc = two_models(make_service)
    assert svc.start().returncode == 0
    with PlanWatch(svc) as watch:
        one(svc, "a")                                      # a loaded

        def b_is_on_its_way() -> None:                     # then a is evicted, b loads
            wait_until(lambda: watch.now()["b"]["state"] in ("loading", "loaded")
                       or watch.now()["a"]["state"] == "unloading", 60, "b to be loading")

        body = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0.0}
        reqs = [{"model": "b", **body}] + [{"model": "a", **body}] * 3
        ends = ask(svc, reqs, then=b_is_on_its_way)
        assert all(len(e) == 1 for e in ends.values()), ends       # nothing answered twice
        assert set(ends) == {1, 2, 3, 4}                           # nothing lost
        assert ends[1][0][0] == "done"                             # b answers
        retry = []
        for s in (2, 3, 4):
            kind, b = ends[s][0]
            if kind == "error":          # no room while b loads: a clear, retryable error
                assert b["code"] == "overloaded" and b["retry_after_ms"] > 0, b
                assert "does not fit" in b["message"] and "'a'" not in b.get("param", "")
                retry.append(b["retry_after_ms"])
        for ms in retry:                 # the client retries after the server's hint
            time.sleep(ms / 1000)
            one(svc, "a")
        st = svc.status()
        c = st["gateway"]["counters"]
        assert c["admitted"] == c["done"] + sum(st["gateway"]["errors"].values()) \
            - st["gateway"]["errors"].get("bad_request", 0)
    assert watch.worst() <= BUDGET


@integration
def test_a_flood_on_one_model_is_overloaded_for_that_model_only(make_service):
    svc = two_models(make_service, load="always", gateway={"max_queue": 1},
                     host={"ram_budget_mb": 0})
    assert svc.start().returncode == 0
    wait_until(lambda: all(m["state"] == "loaded" for m in svc.status()["models"]), 60,
               "both models loaded")
    flood = [{"model": "a", "prompt": "Once upon a time", "max_tokens": 48,
              "temperature": 0.0}] * 6
    b = {"model": "b", "prompt": "Hello", "max_tokens": 4, "temperature": 0.0}
    ends = ask(svc, [*flood, b])
    assert all(len(e) == 1 for e in ends.values()) and len(ends) == 7
    a_ends = [ends[s][0] for s in range(1, 7)]
    over = [body for kind, body in a_ends if kind == "error"]
    assert over and all(x["code"] == "overloaded" and "model 'a'" in x["message"] for x in over)
    assert sum(kind == "done" for kind, _ in a_ends) == 2      # one running, one queued
    kind, body = ends[7][0]
    assert kind == "done"                  # b was admitted and served beside a's flood


@integration
def test_cli_models_load_unload_and_keep_alive(make_service):
    svc = two_models(make_service)
    # b's keep_alive_s is long enough for the two CLI calls between its load and the
    # status read below on a busy machine, short enough to wait for once.
    svc_cfg = svc.config.read_text().replace('name = "b"', 'name = "b"\nkeep_alive_s = 15.0')
    svc.config.write_text(svc_cfg)
    assert svc.start().returncode == 0
    r = svc.llmctl("models")
    assert r.returncode == 0 and "a *" in r.stdout and "unloaded" in r.stdout, r.stdout
    r = svc.llmctl("load", "a")
    assert r.returncode == 0 and "model a loaded" in r.stdout, r.stdout + r.stderr
    r = svc.llmctl("load", "b")                         # a is idle: evicted for b
    assert r.returncode == 0 and "model b loaded" in r.stdout, r.stdout + r.stderr
    rows = {m["name"]: m for m in json.loads(svc.llmctl("models", "--json").stdout)}
    assert rows["a"]["state"] == "unloaded" and rows["a"]["evictions"] == 1
    st = svc.status()
    assert {w["model"] for w in st["workers"]} == {"b"}
    # keep_alive_s: b, idle, unloads by itself
    wait_until(lambda: {m["name"]: m["state"] for m in svc.status()["models"]}["b"]
               == "unloaded", 60, "b to unload after keep_alive_s")
    r = svc.llmctl("load", "zz")
    assert r.returncode == 1 and "no such model: zz" in r.stderr
    r = svc.llmctl("load", "a")
    assert r.returncode == 0
    r = svc.llmctl("unload", "a")
    assert r.returncode == 0 and "model a unloaded" in r.stdout, r.stdout + r.stderr
    assert svc.status()["workers"] == []

    def metrics() -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{svc.http_port}/metrics",
                                      timeout=10).read().decode()
    # the supervisor's figures reach the gateway every half second
    wait_until(lambda: 'llmctl_model_state{model="a",state="unloaded"} 1.0' in metrics(), 10,
               "/metrics to show model a unloaded")
    assert 'llmctl_model_queue_depth{model="b"} 0.0' in metrics()


@integration
def test_start_refuses_a_model_that_can_never_fit(make_service):
    svc = two_models(make_service, host={"ram_budget_mb": 150})     # b needs 161 MiB alone
    r = svc.llmctl("check")
    assert r.returncode == 1 and "model b needs 161 MiB of ram" in r.stderr, r.stdout + r.stderr
    r = svc.start()
    assert r.returncode == 2 and "it could never be loaded" in r.stderr
    assert svc.status()["running"] is False
