"""Tenants: who a request belongs to, its fair share and its limits (``[[tenants]]``).

A request's tenant is named by the key its client presents (an HTTP API key, Bearer or
``x-api-key``; the binary protocol's HELLO token): a ``[[tenants]]`` key, or one of
``[scheduling] keys_file`` (``TENANT KEY`` lines), given as the key or as ``sha256:HEX``
of it.  The keys of ``[http] api_key`` / ``[gateway] token`` and requests without a key
(unless ``[scheduling] require_key``) are the tenant ``default``.  Keys are compared as
SHA-256 digests (one dictionary lookup of the presented key's digest: no timing that
depends on how much of a key matched).

Per tenant: ``max_streams`` open and ``max_queued`` waiting requests, ``requests_per_min``
and ``tokens_per_min`` (token buckets, refilled continuously): a request over one of them
is refused ``rate_limited`` with the time after which it would be admitted.  ``usage`` is
the tokens served to the tenant, decayed with ``usage_half_life_s``: the scheduler orders
waiting work by usage / share (weighted fair queuing by tokens, not requests).  A tenant
that becomes active (its first open request) while others are starts a quantum ahead of
the least-used active one: its past, debt or credit, does not follow it across an idle
time, and its first request may take a slot at once; a tenant that stays active (a
flood) never gets that head start again.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from llmctl.common.config import Config, TenantEntry
from llmctl.common.errors import RateLimited, Unauthorized

log = logging.getLogger(__name__)

DEFAULT = "default"
HTTP, BINARY = "http", "binary"     # fronts with a key of their own: a key of the tenant default
API_KEY_ENV = "LLMCTL_API_KEY"      # overrides [http] api_key when set and not empty


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def _digest_of(spec: str) -> bytes:
    """A configured key: the key itself, or ``sha256:HEX`` of it."""
    return bytes.fromhex(spec[7:]) if spec.startswith("sha256:") else digest(spec)


def read_keys_file(path: str) -> list[tuple[str, str]]:
    """(tenant, key spec) of each ``TENANT KEY`` line of ``path``."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, spec = line.partition(" ")
        if not spec.strip():
            raise ValueError(f"{path}:{n}: expected `TENANT KEY`")
        out.append((name, spec.strip()))
    return out


class Bucket:
    """A token bucket of ``per_min`` a minute (``per_min`` 0: no limit)."""

    def __init__(self, per_min: int, now: float) -> None:
        self.rate = per_min / 60.0
        self.cap = float(per_min)
        self.level = self.cap
        self.t = now

    def refill(self, now: float) -> None:
        if self.rate:
            self.level = min(self.cap, self.level + (now - self.t) * self.rate)
        self.t = now

    def wait_s(self, need: float = 1.0) -> float:
        """Seconds until ``need`` is there (0: now)."""
        if not self.rate or self.level >= need:
            return 0.0
        return (need - self.level) / self.rate


@dataclass
class Tenant:
    entry: TenantEntry
    requests: Bucket
    tokens: Bucket
    open: int = 0                    # admitted, not ended
    usage: float = 0.0               # tokens served, decayed
    fresh: int = 0                   # tokens served since the last fold (the hot path)
    served: int = 0                  # tokens served since start
    admitted: int = 0
    refused: Counter[str] = field(default_factory=Counter)

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def share(self) -> float:
        return self.entry.share


class Tenancy:
    def __init__(self, cfg: Config, now: float) -> None:
        self.t_fold = now
        self.by_name: dict[str, Tenant] = {}
        self.by_digest: dict[bytes, str] = {}
        self.legacy: list[bytes] = []
        self.configure(cfg, now)

    def configure(self, cfg: Config, now: float) -> None:
        """(Re)read the tenants: counts and usage of tenants that stay are kept."""
        self.half_life = cfg.scheduling.usage_half_life_s
        self.quantum = float(cfg.scheduling.quantum_tokens)
        self.require_key = cfg.scheduling.require_key
        entries = {t.name: t for t in cfg.tenants}
        entries.setdefault(DEFAULT, TenantEntry(name=DEFAULT))
        keys = [(t.name, k) for t in cfg.tenants for k in t.keys]
        if cfg.scheduling.keys_file:
            for name, spec in read_keys_file(cfg.scheduling.keys_file):
                entries.setdefault(name, TenantEntry(name=name))
                keys.append((name, spec))
        old = self.by_name
        self.by_name = {}
        for name, e in entries.items():
            t = old.get(name)
            if t is None:
                t = Tenant(e, Bucket(e.requests_per_min, now), Bucket(e.tokens_per_min, now))
            else:
                t.entry = e
                t.requests = Bucket(e.requests_per_min, now)
                t.tokens = Bucket(e.tokens_per_min, now)
            self.by_name[name] = t
        self.by_digest = {_digest_of(spec): name for name, spec in keys}
        http_key = os.environ.get(API_KEY_ENV) or cfg.http.api_key
        # The one shared key of each front: [http] api_key for HTTP, [gateway] token for
        # the binary port; either names the tenant "default".
        self.legacy = {HTTP: digest(http_key) if http_key else None,
                       BINARY: digest(cfg.gateway.token) if cfg.gateway.token else None}

    def keyed(self, front: str) -> bool:
        """Must a request on ``front`` present a key (a tenant's, or the front's own)?"""
        return self.require_key or self.legacy[front] is not None

    def identify(self, key: str | None, front: str = HTTP) -> str:
        """The tenant of a request on ``front`` presenting ``key`` (None: none), or
        Unauthorized."""
        what = "API key" if front == HTTP else "token"
        if key:
            d = digest(key)
            name = self.by_digest.get(d)
            if name is not None:
                return name
            legacy = self.legacy[front]
            if legacy is not None and hmac.compare_digest(d, legacy):
                return DEFAULT
        if self.keyed(front):
            raise Unauthorized(f"missing or wrong {what}")
        return DEFAULT

    def get(self, name: str) -> Tenant:
        return self.by_name.get(name) or self.by_name[DEFAULT]

    def admit(self, name: str, now: float, queued: int = 0) -> Tenant:
        """Count a request in, or RateLimited (which limit, and when to come back);
        ``queued``: the tenant's requests waiting for a slot now."""
        t = self.get(name)
        e = t.entry
        t.requests.refill(now)
        t.tokens.refill(now)
        limit = ""
        if e.max_streams and t.open >= e.max_streams:
            limit, why, wait = "max_streams", f"{e.max_streams} open requests", 1.0
        elif e.max_queued and queued >= e.max_queued:
            limit, why, wait = "max_queued", f"{e.max_queued} waiting requests", 1.0
        elif t.requests.wait_s():
            limit, why = "requests_per_min", f"{e.requests_per_min} requests a minute"
            wait = t.requests.wait_s()
        elif t.tokens.wait_s():
            limit, why = "tokens_per_min", f"{e.tokens_per_min} tokens a minute"
            wait = t.tokens.wait_s()
        if limit:
            t.refused[limit] += 1
            raise RateLimited(f"tenant {t.name!r} is at its limit of {why} ({limit})",
                              retry_after_ms=max(1, math.ceil(wait * 1000)))
        t.requests.level -= 1
        if t.open == 0:
            self._start(t)
        t.open += 1
        t.admitted += 1
        return t

    def _start(self, t: Tenant) -> None:
        """Place a tenant that becomes active a quantum (and a token) ahead of the
        least-used active one."""
        active = [self.norm_usage(u.name) for u in self.by_name.values() if u.open and u is not t]
        if active:
            t.usage = (min(active) - self.quantum - 1) * t.share - t.fresh

    def release(self, t: Tenant) -> None:
        """A request of ``t`` ended (or was not admitted after all)."""
        t.open -= 1

    def fold(self, now: float) -> None:
        """Decay the usage, take the tokens served since the last fold off the buckets."""
        dt = now - self.t_fold
        self.t_fold = now
        decay = 0.5 ** (dt / self.half_life) if dt > 0 else 1.0
        for t in self.by_name.values():
            t.usage = t.usage * decay + t.fresh
            t.served += t.fresh
            if t.fresh:
                t.tokens.refill(now)
                t.tokens.level -= t.fresh
            t.fresh = 0

    def norm_usage(self, name: str) -> float:
        t = self.get(name)
        return (t.usage + t.fresh) / t.share

    def snapshot(self, queued: Counter[str] | None = None) -> dict[str, dict[str, object]]:
        """Each tenant's figures; ``queued``: its requests waiting for a slot now."""
        queued = queued or Counter()
        return {t.name: {"share": t.share, "open": t.open, "queued": queued[t.name],
                         "admitted": t.admitted, "tokens": t.served + t.fresh,
                         "usage": round(t.usage, 1), "refused": dict(t.refused)}
                for t in self.by_name.values()}
