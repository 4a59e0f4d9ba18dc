"""dataplane/fairness.py and the scheduler's fair dispatch (pure state): who runs next,
who yields its slot, and dataplane/tenants.py: keys, limits, usage."""
from __future__ import annotations

import hashlib

import msgspec
import pytest

from llmctl.common.config import Config, SchedulingConfig, TenantEntry
from llmctl.common.errors import RateLimited, Unauthorized
from llmctl.common.request import GenRequest
from llmctl.dataplane.fairness import Fairness
from llmctl.dataplane.scheduler import Scheduler, WorkerState
from llmctl.dataplane.streams import Stream
from llmctl.dataplane.tenants import DEFAULT, Tenancy, read_keys_file
from tests.fakes import Recorder

NOW = 1000.0


def stream(pieces: int = 0, tenant: str = DEFAULT, priority: int = 0, waited: float = 0.0,
           ran: int | None = None, max_tokens: int = 128) -> Stream:
    s = Stream(request=GenRequest(prompt="x", priority=priority, max_tokens=max_tokens),
               out=Recorder(),
               tenant=tenant, t_admit=NOW - waited)
    s.pieces = pieces
    s.slice_start = pieces - (ran if ran is not None else pieces)
    return s


def fairness(usage: dict[str, float] | None = None, **cfg) -> Fairness:
    u = usage or {}
    return Fairness(SchedulingConfig(**cfg), lambda t: u.get(t, 0.0))


def test_waiting_work_is_served_starving_first_then_by_tenant_priority_service_age():
    f = fairness({"busy": 1000.0, "idle": 10.0}, starvation_s=10.0)
    starving = stream(900, tenant="busy", waited=31.0)
    idle_tenant = stream(500, tenant="idle")
    urgent = stream(700, tenant="busy", priority=-5)
    short = stream(0, tenant="busy", waited=1.0)
    long_ = stream(800, tenant="busy", waited=2.0)
    older = stream(0, tenant="busy", waited=3.0)
    order = sorted([long_, short, urgent, idle_tenant, starving, older],
                   key=lambda s: f.key(s, NOW))
    assert order == [starving, idle_tenant, urgent, older, short, long_]


def test_a_short_request_goes_before_long_ones_and_before_a_round_of_time_slices():
    """Among requests that have received nothing, the smallest budget first; a started
    request parked for less than 3 x starvation_s is in the round of slices, not starving;
    one that has waited starvation_s for its first token, or 3 x for its next, is."""
    f = fairness(starvation_s=10.0)
    short = stream(0, max_tokens=8, waited=0.5)
    unstarted_long = stream(0, max_tokens=1500, waited=9.0)
    parked_long = stream(256, max_tokens=1500, waited=25.0)
    assert sorted([parked_long, unstarted_long, short], key=lambda s: f.key(s, NOW)) == \
        [short, unstarted_long, parked_long]
    starved_long = stream(0, max_tokens=1500, waited=10.0)
    starved_parked = stream(256, max_tokens=1500, waited=31.0)
    assert sorted([short, starved_long, starved_parked], key=lambda s: f.key(s, NOW)) == \
        [starved_parked, starved_long, short]
    assert f.deserves(starved_parked, stream(300, ran=300), NOW)
    assert not f.deserves(parked_long, stream(300, ran=300), NOW)
    # The starving take slots from requests that have had a whole slice, never cut a
    # short answer in its first quantum.
    assert not f.deserves(starved_long, stream(60, ran=60, max_tokens=64), NOW)
    assert f.deserves(starved_long, stream(400, ran=128), NOW)


def test_a_new_request_takes_the_slot_of_the_one_furthest_ahead():
    f = fairness(quantum_tokens=128, min_run_tokens=16)
    running = [stream(300, ran=200), stream(900, ran=20), stream(50, ran=50)]
    assert f.yields([stream(0)], running, free=0, now=NOW) == [running[1]]


def test_nobody_yields_to_work_that_does_not_deserve_it():
    f = fairness(quantum_tokens=128, min_run_tokens=16)
    assert f.yields([stream(0)], [stream(900, ran=10)], 0, NOW) == []   # just (re)started
    assert f.yields([stream(0)], [stream(100, ran=100)], 0, NOW) == []  # < a quantum ahead
    assert f.yields([stream(0)], [stream(900, ran=900)], free=1, now=NOW) == []  # a free slot
    assert fairness(policy="fifo").yields([stream(0)], [stream(900, ran=900)], 0, NOW) == []


def test_yielding_follows_the_tenants_shares_and_the_priorities():
    f = fairness({"noisy": 5000.0, "quiet": 0.0}, quantum_tokens=128)
    quiet = stream(0, tenant="quiet")
    noisy_running = stream(40, tenant="noisy", ran=40)
    assert f.yields([quiet], [noisy_running], 0, NOW) == [noisy_running]
    # the quiet tenant's own running request does not yield to the noisy tenant
    assert f.yields([stream(0, tenant="noisy")], [stream(40, tenant="quiet", ran=40)], 0,
                    NOW) == []
    low = stream(40, priority=5, ran=40)
    assert f.yields([stream(30, priority=0)], [low], 0, NOW) == [low]


def test_one_running_request_yields_per_waiting_one():
    f = fairness(quantum_tokens=10, min_run_tokens=1)
    running = [stream(100 + i, ran=50) for i in range(4)]
    got = f.yields([stream(0), stream(0)], running, 0, NOW)
    assert len(got) == 2 and len(set(map(id, got))) == 2


def test_the_fair_scheduler_resumes_a_yielded_request_when_it_comes_first():
    sched = Scheduler(10, fairness=fairness(quantum_tokens=10, min_run_tokens=1))
    sched.add_worker(WorkerState("w0", slots=1))
    long_ = stream(0)
    sched.admit(long_)
    [(w, s, resumed)] = sched.dispatch(NOW)
    assert s is long_ and not resumed
    long_.pieces = 50
    short = stream(0)
    sched.admit(short)
    assert sched.dispatch(NOW) == []                         # no credit
    [(w, victim)] = sched.preempt(NOW)
    assert victim is long_ and long_.park_sent
    assert sched.preempt(NOW) == []                          # already asked
    assert sched.park("w0", long_.rid) is long_              # PARKED: the credit is back
    sched.want_resume(long_)
    [(w, s, resumed)] = sched.dispatch(NOW)
    assert s is short and not resumed                        # less attained service
    short.pieces = 3
    sched.complete("w0", short.rid)
    [(w, s, resumed)] = sched.dispatch(NOW)
    assert s is long_ and resumed and not long_.parked and not long_.park_sent


def test_starving_requests_take_at_most_half_the_slots():
    """A crowd of old requests (clients that never read, say) starves all at once: half
    the slots go to them, oldest first; the rest keep the fair order, so the fresh short
    requests behind them are served at once, and nobody waits for ever."""
    sched = Scheduler(20, fairness=fairness(starvation_s=10.0))
    sched.add_worker(WorkerState("w0", slots=4))
    old = [stream(0, max_tokens=1500, waited=20.0 + i) for i in range(6)]
    fresh = [stream(0, max_tokens=64, waited=0.5) for _ in range(2)]
    for s in [*old, *fresh]:
        sched.admit(s)
    got = [s for _, s, _ in sched.dispatch(NOW)]
    assert len(got) == 4 and set(fresh) <= set(got)
    assert [s for s in got if s in old] == [old[5], old[4]]     # the two oldest
    assert [s.starved for s in got] == [s in old for s in got]
    sched.complete("w0", fresh[0].rid)              # a fresh one ends: no room for a third
    [(_, s, _)] = sched.dispatch(NOW)               # starving one: the fair order instead
    assert s in old and not s.starved
    sched.complete("w0", old[5].rid)                # a starved one ends: room again
    [(_, s, _)] = sched.dispatch(NOW)
    assert s in old and s.starved


# ---- tenants ------------------------------------------------------------------------------

def config(*tenants: TenantEntry, **scheduling) -> Config:
    c = Config()
    return msgspec.structs.replace(c, tenants=tenants, scheduling=msgspec.structs.replace(
        c.scheduling, **scheduling))


def test_keys_name_tenants_plain_or_hashed():
    hashed = "sha256:" + hashlib.sha256(b"k2").hexdigest()
    t = Tenancy(config(TenantEntry(name="a", keys=("k1",)),
                       TenantEntry(name="b", keys=(hashed,))), NOW)
    assert (t.identify("k1"), t.identify("k2"), t.identify(None)) == ("a", "b", DEFAULT)
    assert t.identify("someone else") == DEFAULT             # no key required
    strict = Tenancy(config(TenantEntry(name="a", keys=("k1",)), require_key=True), NOW)
    assert strict.identify("k1") == "a"
    for key in (None, "nope"):
        with pytest.raises(Unauthorized):
            strict.identify(key)


def test_the_legacy_keys_are_the_default_tenant_and_required():
    c = msgspec.structs.replace(Config(), http=msgspec.structs.replace(Config().http,
                                                                        api_key="sk"))
    t = Tenancy(c, NOW)
    assert t.identify("sk") == DEFAULT
    with pytest.raises(Unauthorized):
        t.identify("other")
    assert t.identify(None, "binary") == DEFAULT      # [http] api_key is HTTP's alone


def test_limits_refuse_with_when_to_come_back():
    t = Tenancy(config(TenantEntry(name="a", keys=("k",), max_streams=2),
                       TenantEntry(name="b", keys=("j",), requests_per_min=2),
                       TenantEntry(name="c", keys=("i",), tokens_per_min=60)), NOW)
    first = t.admit("a", NOW)
    t.admit("a", NOW)
    with pytest.raises(RateLimited, match="max_streams"):
        t.admit("a", NOW)
    t.release(first)
    t.admit("a", NOW)                          # a slot of its own is free again
    t.admit("b", NOW)
    t.admit("b", NOW)
    with pytest.raises(RateLimited) as exc:
        t.admit("b", NOW)
    assert exc.value.code.value == "rate_limited" and 29_000 <= exc.value.retry_after_ms <= 30_000
    t.admit("b", NOW + 31)                     # refilled: 2 a minute is one per 30 s
    c = t.admit("c", NOW)
    c.fresh = 90                               # it was served 90 tokens
    t.fold(NOW + 1)
    with pytest.raises(RateLimited, match="tokens_per_min") as exc:
        t.admit("c", NOW + 1)
    assert exc.value.retry_after_ms >= 29_000
    assert t.snapshot()["c"]["refused"] == {"tokens_per_min": 1}


def test_usage_decays_with_its_half_life_and_counts_per_share():
    t = Tenancy(config(TenantEntry(name="a", share=2.0), usage_half_life_s=10.0), NOW)
    t.get("a").fresh = 100
    t.fold(NOW)
    assert t.norm_usage("a") == pytest.approx(50.0)
    t.fold(NOW + 10)
    assert t.norm_usage("a") == pytest.approx(25.0)


def test_a_tenant_that_becomes_active_starts_a_quantum_ahead_of_the_active_ones():
    """No debt from being served alone, no credit from being idle: a quantum ahead of the
    least-used active tenant, so that its first request may take a slot at once."""
    t = Tenancy(config(TenantEntry(name="quiet"), TenantEntry(name="noisy"),
                       quantum_tokens=128), NOW)
    quiet, noisy = t.get("quiet"), t.get("noisy")
    quiet.usage = 7000.0                        # served alone a while ago
    t.admit("noisy", NOW)
    assert noisy.usage == 0.0                   # nobody else active: kept
    noisy.usage = 500.0
    t.admit("quiet", NOW)
    assert t.norm_usage("quiet") == pytest.approx(500.0 - 128 - 1)   # the debt is gone ...
    t.release(quiet)
    quiet.usage = 0.0                           # ... and idling earns no credit
    t.admit("quiet", NOW)
    assert t.norm_usage("quiet") == pytest.approx(500.0 - 128 - 1)
    f = Fairness(SchedulingConfig(quantum_tokens=128), t.norm_usage)
    assert f.deserves(stream(0, tenant="quiet"), stream(300, tenant="noisy", ran=300), NOW)


def test_keys_file_and_reconfigure_keep_what_runs(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# tenants\nteam-x  secret-x\nteam-y sha256:" +
                 hashlib.sha256(b"secret-y").hexdigest() + "\n")
    assert read_keys_file(str(f))[0] == ("team-x", "secret-x")
    t = Tenancy(config(keys_file=str(f)), NOW)
    assert (t.identify("secret-x"), t.identify("secret-y")) == ("team-x", "team-y")
    x = t.admit("team-x", NOW)
    t.configure(config(TenantEntry(name="team-x", max_streams=1), keys_file=str(f)), NOW)
    assert t.get("team-x") is x and x.open == 1          # the same accounts, new limits
    with pytest.raises(RateLimited):
        t.admit("team-x", NOW)


def test_config_refuses_duplicate_tenants_and_keys(tmp_path):
    from llmctl.common import config as cfgmod

    def load(text: str):
        p = tmp_path / "c.toml"
        p.write_text(text)
        return cfgmod.load(p)

    with pytest.raises(cfgmod.ConfigError, match="duplicate name"):
        load('[[tenants]]\nname = "a"\n[[tenants]]\nname = "a"\n')
    with pytest.raises(cfgmod.ConfigError, match="a key of 'a' too"):
        load('[[tenants]]\nname = "a"\nkeys = ["k"]\n[[tenants]]\nname = "b"\nkeys = ["k"]\n')
    with pytest.raises(cfgmod.ConfigError, match=r"\[\[tenants\]\] entry 1 \('a'\) share"):
        load('[[tenants]]\nname = "a"\nshare = 0\n')
    assert load('[[tenants]]\nname = "a"\nshare = 3\n').tenants[0].share == 3.0
