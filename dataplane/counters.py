"""The gateway's counters, typed (status, /metrics): one field per thing counted."""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Counters:
    admitted: int = 0
    dispatched: int = 0
    done: int = 0
    cancelled: int = 0             # by the client (CANCEL, disconnect)
    cancelled_queued: int = 0
    cancelled_prefill: int = 0     # where the worker was when it stopped
    cancelled_decode: int = 0
    expired_queued: int = 0
    expired_running: int = 0
    requeued: int = 0              # sent to another worker: its own died before output
    worker_failed: int = 0
    slow_clients: int = 0          # streams ended with slow_client (or clients dropped)
    parked: int = 0
    resumed: int = 0
    probes: int = 0
    probes_failed: int = 0
    prompt_tokens: int = 0
    cache_hit_tokens: int = 0
    dropped_messages: int = 0      # malformed internal messages, logged and dropped
    connections: int = 0           # open TCP client connections (a gauge)
    errors: Counter[str] = field(default_factory=Counter)   # answered to clients, by code

    def snapshot(self) -> dict[str, int]:
        """Every counter but the errors and the connections gauge, as status shows them."""
        out = dataclasses.asdict(self)
        del out["errors"], out["connections"]
        return out
