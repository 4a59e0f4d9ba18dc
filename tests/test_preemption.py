"""Time-sliced slots ([scheduling] policy "fair"): a short request is not stuck behind long
ones, a request that yields its slot goes on exactly where it stopped, and tenants' limits
answer rate_limited on both fronts."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from tests.service import wait_until

pytestmark = pytest.mark.integration


def test_a_short_request_overtakes_long_ones_and_the_long_ones_lose_nothing(make_service):
    """Synthetic workers (100 tokens/s a sequence) on 2 slots, four 400-token requests
    taking turns: a short request is answered while all four still run, and each long
    one gets every one of its tokens."""
    s = make_service(model={"engine": "synthetic"}, workers={"slots": 2},
                     synthetic={"step_ms": 10.0},
                     scheduling={"quantum_tokens": 32, "min_run_tokens": 4})
    assert s.start().returncode == 0
    with s.client() as longs, s.client() as other:
        for k in range(1, 5):
            longs.generate(k, prompt=f"long {k}", max_tokens=400)
        wait_until(lambda: s.counters()["yielded"] >= 2, 60, "the long ones to take turns")
        short = other.complete(1, prompt="short", max_tokens=8)
        assert short.done["completion_tokens"] == 8
        assert s.counters()["done"] == 1, "a long request ended before the short one"
        res = longs.collect({1, 2, 3, 4})
    for k in range(1, 5):
        assert res[k].done["completion_tokens"] == 400 and res[k].text == " tok" * 400


def test_a_request_that_yields_resumes_with_the_same_greedy_output(make_service):
    """The real model, one slot, a small quantum: two greedy requests take turns in the
    slot (parked and resumed several times each), and each gives the text it gives alone."""
    s = make_service(workers={"slots": 1, "probe_interval_s": 0.0},
                     scheduling={"quantum_tokens": 8, "min_run_tokens": 4})
    assert s.start().returncode == 0
    a = dict(prompt="The history of the city of Rome begins", max_tokens=48, temperature=0)
    b = dict(prompt="A recipe for bread: first, take", max_tokens=48, temperature=0)
    with s.client() as c:
        alone = {1: c.complete(1, **a).text, 2: c.complete(2, **b).text}
        c.generate(3, **a)
        c.generate(4, **b)
        together = c.collect({3, 4})
    assert s.counters()["yielded"] >= 2
    assert together[3].text == alone[1] and together[4].text == alone[2]
    assert together[3].done["completion_tokens"] == 48


def test_tenant_limits_answer_rate_limited_on_both_fronts(make_service):
    s = make_service(model={"engine": "synthetic"}, workers={"slots": 4},
                     http={"enabled": True},
                     tenants=[{"name": "quiet", "keys": ["k-quiet"], "share": 2.0},
                              {"name": "noisy", "keys": ["k-noisy"], "requests_per_min": 2}],
                     scheduling={"require_key": True})
    assert s.start().returncode == 0
    url = f"http://127.0.0.1:{s.http_port}/v1/completions"

    def post(key: str | None, header: str = "Authorization") -> tuple[int, dict, dict]:
        body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
        req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
        if key:
            req.add_header(header, f"Bearer {key}" if header == "Authorization" else key)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, dict(r.headers), json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), json.loads(e.read())

    assert post("k-noisy")[0] == 200
    assert post("k-noisy", "x-api-key")[0] == 200          # Anthropic's header: same key
    code, headers, body = post("k-noisy")
    assert code == 429 and body["error"]["code"] == "rate_limited"
    assert 1 <= int(headers["Retry-After"]) <= 30
    assert post("k-quiet")[0] == 200                          # another tenant's limit
    assert post(None)[0] == 401 and post("wrong")[0] == 401
    with s.client(hello=False) as c:
        c.hello(token="k-noisy")
        r = c.complete(1, prompt="hi", max_tokens=2)
    assert r.error["code"] == "rate_limited" and r.error["retry_after_ms"] > 0
    st = s.status()
    assert st["tenants"]["noisy"]["refused"] == {"requests_per_min": 2}
    assert st["tenants"]["quiet"]["admitted"] == 1
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{s.http_port}/metrics").read().decode()
    assert 'llmctl_tenant_refused_total{limit="requests_per_min",tenant="noisy"} 2.0' in metrics
    wait_until(s.idle, 30, "the service to be idle")


def test_reload_applies_new_tenants_and_limits_and_keeps_running_streams(make_service):
    """`llmctl reload` with a new tenant and a new limit: the stream that runs goes on to
    its last token, the new key names its tenant, the new limit refuses what is over it."""
    s = make_service(model={"engine": "synthetic"}, workers={"slots": 4},
                     synthetic={"step_ms": 10.0},
                     tenants=[{"name": "a", "keys": ["k-a"]}],
                     scheduling={"require_key": True})
    assert s.start().returncode == 0
    with s.client(hello=False) as a:
        a.hello(token="k-a")
        a.generate(1, prompt="long", max_tokens=400)
        wait_until(lambda: s.status()["tenants"]["a"]["tokens"] >= 10, 30,
                   "the long stream to run")
        text = s.config.read_text().replace('name = "a"\n', 'name = "a"\nmax_streams = 1\n')
        s.config.write_text(text + '[[tenants]]\nname = "b"\nkeys = ["k-b"]\n')
        assert s.llmctl("reload").returncode == 0
        wait_until(lambda: "b" in s.status().get("tenants", {}), 30, "the new tenant")
        refused = a.complete(2, prompt="another", max_tokens=2)
        assert refused.error["code"] == "rate_limited"
        assert "max_streams" in refused.error["message"]
        with s.client(hello=False) as b:
            b.hello(token="k-b")
            assert b.complete(1, prompt="hi", max_tokens=2).done["completion_tokens"] == 2
        long_ = a.collect({1})[1]
    assert long_.done["completion_tokens"] == 400 and long_.text == " tok" * 400
    assert s.status()["tenants"]["a"]["refused"] == {"max_streams": 1}
