"""Who runs next, and who yields: the ``[scheduling] policy = "fair"`` rules (pure).

Waiting work (new requests, and requests parked to yield their slot) is served in this
order:

1. a starving request (the oldest first): one that has waited ``starvation_s`` for its
   first token, or a started one parked for three times that: nothing waits for ever,
   whatever arrives meanwhile (a started request parked in the round of time slices is
   not starving: it has been served, and comes back by rule 4).  Starving requests take
   at most half of the model's slots (at least one) at a time (``starving_room``): the
   rest keep the order below, so a crowd of old requests (clients that never read, say)
   cannot take every slot from the requests behind it;
2. the tenant with the least tokens served lately, per unit of its share (``usage`` /
   ``share``, decayed with ``usage_half_life_s``): weighted fair queuing by tokens;
3. within a tenant, the request's ``priority`` (lower first, vLLM's convention);
4. then least attained service: the request that has received the fewest tokens (a new
   one has none, so a short answer is not stuck behind long ones);
5. then the smallest remaining budget (``max_tokens`` less what it has received): of two
   requests that have received nothing, the one asking for 8 tokens goes before the one
   asking for 1,500;
6. then the one waiting longest.

A running request yields its slot (it is parked, its KV kept, and resumed later exactly
where it stopped) to the waiting request that comes first, when it has run at least
``min_run_tokens`` since it (re)started and the waiting one deserves the slot more: it
starves (then the running one yields once it has run a whole ``quantum_tokens`` slice,
so an answer shorter than a quantum is never cut), or its tenant's usage is a ``quantum_tokens`` lower (per share), or (same
tenant) its priority is lower, or (same tenant and priority) it has received
``quantum_tokens`` fewer.  The one that yields is the running request furthest ahead by
the same measures.  ``policy = "fifo"`` does none of this: first come, first served.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

from llmctl.common.config import SchedulingConfig

if TYPE_CHECKING:
    from llmctl.dataplane.streams import Stream


@dataclass(frozen=True)
class Fairness:
    cfg: SchedulingConfig
    usage: Callable[[str], float]        # a tenant's recent tokens / share

    @property
    def fair(self) -> bool:
        return self.cfg.policy == "fair"

    def starving(self, s: "Stream", now: float) -> bool:
        limit = self.cfg.starvation_s if s.pieces == 0 else 3 * self.cfg.starvation_s
        return now - s.t_wait >= limit

    @staticmethod
    def starving_room(slots: int, running: Iterable["Stream"]) -> int:
        """How many more starving requests may go first: half the slots (at least one)
        less those running because they starved."""
        return max(1, slots // 2) - sum(1 for r in running if r.starved)

    def key(self, s: "Stream", now: float, room: bool = True) -> tuple:
        """Waiting work's order: the smallest key goes first (a starving request first
        while there is ``room`` for one)."""
        if room and self.starving(s, now):
            return (0, 0.0, 0, 0, 0, s.t_wait)
        return (1, self.usage(s.tenant), s.request.priority, s.pieces,
                s.request.max_tokens - s.pieces, s.t_wait)

    def ahead(self, s: "Stream") -> tuple:
        """How far ahead a running request is: the largest yields first."""
        return (self.usage(s.tenant), s.request.priority, s.pieces)

    def deserves(self, w: "Stream", r: "Stream", now: float, room: bool = True) -> bool:
        """Should running ``r`` yield its slot to waiting ``w``?"""
        q = self.cfg.quantum_tokens
        if room and self.starving(w, now):      # a whole slice, then the starving one
            return r.pieces - r.slice_start >= q
        if w.tenant != r.tenant:
            return self.usage(r.tenant) - self.usage(w.tenant) >= q
        if w.request.priority != r.request.priority:
            return w.request.priority < r.request.priority
        return r.pieces - w.pieces >= q

    def can_yield(self, r: "Stream") -> bool:
        """A running request that may be asked to yield now (not one whose client stopped
        reading: ``clock.py`` parks that one)."""
        return not (r.internal or r.finished or r.parked or r.park_sent) \
            and r.stalled_since is None \
            and r.pieces - r.slice_start >= self.cfg.min_run_tokens

    def yields(self, waiting: Iterable["Stream"], running: Iterable["Stream"], free: int,
               now: float, room: int = 1 << 30) -> list["Stream"]:
        """The running requests that yield to the waiting ones beyond ``free`` slots;
        ``room`` starving ones may go first (``starving_room``)."""
        if not self.fair:
            return []
        waiting = list(waiting)
        starving = sorted((s for s in waiting if self.starving(s, now)),
                          key=lambda s: s.t_wait)[:max(0, room)]
        first = {id(s) for s in starving}
        queue = sorted(waiting, key=lambda s: self.key(s, now, id(s) in first))[free:]
        candidates = sorted((r for r in running if self.can_yield(r)), key=self.ahead,
                            reverse=True)
        out = []
        for w in queue:
            victim = next((r for r in candidates
                           if self.deserves(w, r, now, id(w) in first)), None)
            if victim is None:
                continue
            candidates.remove(victim)
            out.append(victim)
        return out
