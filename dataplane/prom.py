"""Prometheus exposition of the gateway's figures (``GET /metrics`` on the HTTP port).

A collector reads the gateway at scrape time (no global registry, nothing updated
twice): request counters and errors by code, histograms of TTFT, end-to-end
latency, queue wait and inter-token latency, gauges of queue and credits, and the
process figures (states, restarts, RSS, CPU, VRAM) the supervisor pushes.
Every name is prefixed ``llmctl_``; the ``llamacpp:`` families are llama-server's
(``_llamacpp_families``), from the same figures, for the dashboards that read them.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from llmctl.dataplane.gateway import Gateway
from llmctl.dataplane.metrics import PROM_BUCKETS_S, Windowed

log = logging.getLogger(__name__)

WORKER_STATES = ("starting", "ready", "busy", "draining", "backoff", "fatal", "stopped")


def _histogram(name: str, doc: str, w: Windowed) -> HistogramMetricFamily:
    cumulative, buckets = 0, []
    for le, n in zip((*PROM_BUCKETS_S, float("inf")), w.prom):
        cumulative += n
        buckets.append(("+Inf" if le == float("inf") else repr(le), cumulative))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=w.total.sum / 1000.0)


class GatewayCollector:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def collect(self) -> Iterator[Metric]:
        gw, mt = self.gw, self.gw.metrics
        c = CounterMetricFamily("llmctl_requests", "Requests by outcome", labels=["outcome"])
        for key in ("admitted", "dispatched", "done", "cancelled", "requeued", "worker_failed",
                    "expired_queued", "expired_running"):
            c.add_metric([key], getattr(gw.counters, key))
        yield c
        e = CounterMetricFamily("llmctl_errors", "Errors answered, by code", labels=["code"])
        for code, n in sorted(gw.counters.errors.items()):
            e.add_metric([code], n)
        yield e
        yield CounterMetricFamily("llmctl_prompt_tokens", "Prompt tokens of finished requests",
                                  value=mt.prompt_tokens)
        yield CounterMetricFamily("llmctl_completion_tokens", "Tokens generated (finished requests)",
                                  value=mt.completion_tokens)
        yield CounterMetricFamily("llmctl_cached_prompt_tokens",
                                  "Prompt tokens served from a worker's KV cache",
                                  value=mt.cached_tokens)
        yield CounterMetricFamily("llmctl_spec_drafted_tokens",
                                  "Draft tokens verified by speculative decoding",
                                  value=gw.counters.drafted_tokens)
        yield CounterMetricFamily("llmctl_spec_accepted_tokens",
                                  "Draft tokens kept (generated) by speculative decoding",
                                  value=gw.counters.accepted_tokens)
        drafted, accepted = gw.counters.drafted_tokens, gw.counters.accepted_tokens
        yield GaugeMetricFamily("llmctl_spec_acceptance_rate",
                                "Kept over verified draft tokens since start (0: none drafted)",
                                value=accepted / drafted if drafted else 0.0)
        yield CounterMetricFamily("llmctl_streamed_tokens", "TOKEN pieces streamed to clients",
                                  value=mt.tokens_out.total)
        yield CounterMetricFamily("llmctl_slow_clients", "Clients dropped for not reading",
                                  value=gw.counters.slow_clients)
        yield _histogram("llmctl_ttft_seconds", "Time to first token, admission to first TOKEN",
                         mt.ttft)
        yield _histogram("llmctl_request_duration_seconds", "End-to-end latency of finished "
                         "requests", mt.e2e)
        yield _histogram("llmctl_queue_wait_seconds", "Time from admission to dispatch",
                         mt.queue_wait)
        yield _histogram("llmctl_inter_token_seconds", "Time between consecutive TOKENs",
                         mt.itl)
        st = gw.sched
        kv = [GaugeMetricFamily(f"llmctl_kv_store_{key}", doc, labels=["worker"]) for key, doc in (
            ("bytes", "Bytes of KV states in a worker's host-memory prompt store"),
            ("entries", "KV states in a worker's host-memory prompt store"),
            ("hit_tokens", "Prompt tokens restored from a worker's host-memory store"))]
        for w in st.workers.values():
            for fam, key in zip(kv, ("bytes", "entries", "hit_tokens")):
                if key in w.kv_store:
                    fam.add_metric([w.name], w.kv_store[key])
        yield from kv
        yield from _tenant_families(gw)
        threads = GaugeMetricFamily("llmctl_worker_compute_threads", "Threads a worker's "
                                    "model computes with now ([host] threads_policy)",
                                    labels=["worker"])
        for w in st.workers.values():
            if w.threads:
                threads.add_metric([w.name], w.threads["n"])
        yield threads
        yield GaugeMetricFamily("llmctl_queue_depth", "Requests waiting for credit",
                                value=len(st.queue))
        yield GaugeMetricFamily("llmctl_inflight", "Requests held by workers",
                                value=st.inflight_count())
        yield GaugeMetricFamily("llmctl_free_credits", "Dispatch credits not in use",
                                value=sum(w.available for w in st.workers.values()))
        yield GaugeMetricFamily("llmctl_connections", "Open TCP client connections",
                                value=gw.counters.connections)
        yield GaugeMetricFamily("llmctl_tokens_per_second", "Tokens streamed per second over "
                                "the window", value=mt.tokens_out.rate())
        info = GaugeMetricFamily("llmctl_worker_info", "1 for every worker connected to the "
                                 "gateway, with the machine it runs on",
                                 labels=["worker", "node", "device"])
        for w in st.workers.values():
            info.add_metric([w.name, w.node, w.device], 1.0)
        yield info
        yield from self._processes()
        yield from _llamacpp_families(gw)

    def _processes(self) -> Iterator[Metric]:
        procs: dict[str, Any] = self.gw.procs
        workers = procs.get("workers", [])
        state = GaugeMetricFamily("llmctl_worker_state", "1 for the worker's current state",
                                  labels=["worker", "model", "state"])
        restarts = CounterMetricFamily("llmctl_worker_restarts", "Restarts of a worker",
                                       labels=["worker", "model"])
        rss = GaugeMetricFamily("llmctl_process_rss_bytes", "Resident memory",
                                labels=["process"])
        cpu = GaugeMetricFamily("llmctl_process_cpu_percent", "CPU use", labels=["process"])
        vram = GaugeMetricFamily("llmctl_worker_vram_bytes", "GPU memory (NVML)",
                                 labels=["worker", "model"])
        busy = GaugeMetricFamily("llmctl_worker_busy_slots", "Slots in use",
                                 labels=["worker", "model"])
        live = {w.name: w for w in self.gw.sched.workers.values()}
        for w in workers:
            name, model = w["name"], w.get("model") or self.gw.model_name
            # A running process: the gateway's own view (ready, busy, draining) says more.
            now = live[name].state if name in live and w.get("state") == "running" \
                else w.get("state")
            for s in WORKER_STATES:
                state.add_metric([name, model, s], 1.0 if now == s else 0.0)
            restarts.add_metric([name, model], w.get("restarts", 0))
            if w.get("vram_mib") is not None:
                vram.add_metric([name, model], w["vram_mib"] * 2 ** 20)
            busy.add_metric([name, model], len(live[name].inflight) if name in live else 0)
        for name, p in [("supervisor", procs.get("supervisor")), ("gateway", procs.get("gateway")),
                        *((w["name"], w) for w in workers)]:
            if p and p.get("rss") is not None:
                rss.add_metric([name], p["rss"])
            if p and p.get("cpu") is not None:
                cpu.add_metric([name], p["cpu"])
        yield from (state, restarts, rss, cpu, vram, busy)
        yield from self._models(procs.get("models") or {})
        g = procs.get("gpu") or {}
        yield GaugeMetricFamily("llmctl_vram_budget_bytes", "The VRAM budget",
                                value=float(g.get("budget_mib", 0.0)) * 2 ** 20)
        yield GaugeMetricFamily("llmctl_vram_used_bytes", "VRAM used by the workers (NVML)",
                                value=float(g.get("total_mib", 0.0)) * 2 ** 20)


    def _models(self, states: dict[str, Any]) -> Iterator[Metric]:
        """Per served model: its state (the supervisor's), queue and requests held."""
        st = GaugeMetricFamily("llmctl_model_state", "1 for the model's current state",
                               labels=["model", "state"])
        queue = GaugeMetricFamily("llmctl_model_queue_depth", "Requests waiting for the "
                                  "model's credit (or for it to load)", labels=["model"])
        held = GaugeMetricFamily("llmctl_model_inflight", "Requests held by the model's "
                                 "workers", labels=["model"])
        for sched in self.gw.sched:
            now = (states.get(sched.model) or {}).get("state") \
                or ("loaded" if sched.ready else "unloaded")
            for s in MODEL_STATES:
                st.add_metric([sched.model, s], 1.0 if now == s else 0.0)
            queue.add_metric([sched.model], len(sched.queue))
            held.add_metric([sched.model], sched.inflight_count())
        yield from (st, queue, held)


MODEL_STATES = ("unloaded", "loading", "loaded", "unloading")


def registry_for(gw: Gateway) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(GatewayCollector(gw))  # type: ignore[arg-type]
    return reg


def add_metrics_route(app: web.Application, gw: Gateway) -> None:
    registry = registry_for(gw)

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/metrics", metrics)


def _tenant_families(gw: Any) -> Any:
    """Per tenant ([[tenants]]): requests admitted and refused, tokens served, open now."""
    admitted = CounterMetricFamily("llmctl_tenant_requests", "Requests a tenant had "
                                   "admitted", labels=["tenant"])
    tokens = CounterMetricFamily("llmctl_tenant_tokens", "Tokens served to a tenant",
                                 labels=["tenant"])
    refused = CounterMetricFamily("llmctl_tenant_refused", "Requests of a tenant refused "
                                  "rate_limited, by the limit", labels=["tenant", "limit"])
    open_ = GaugeMetricFamily("llmctl_tenant_open", "A tenant's requests open now (queued "
                              "or running)", labels=["tenant"])
    for name, t in gw.tenancy.snapshot(gw.waiting()).items():
        admitted.add_metric([name], t["admitted"])
        tokens.add_metric([name], t["tokens"])
        open_.add_metric([name], t["open"])
        for limit, n in t["refused"].items():
            refused.add_metric([name, limit], n)
    return [admitted, tokens, refused, open_]


def _llamacpp_families(gw: Any) -> list[Metric]:
    """llama-server's ``llamacpp:`` families: its counters from the finished requests'
    statistics, its gauges from the queue and the requests held by workers.  A decode
    step here is one token of one sequence (``n_decode_total``); llmctl does not
    decode speculatively (the ``spec_decode`` counters stay 0)."""
    mt, st = gw.metrics, gw.sched
    prefill_s = sum(mt.worker_prefill_ms.values()) / 1000.0
    decode_s = sum(mt.worker_decode_ms.values()) / 1000.0
    evaluated = mt.prompt_tokens - mt.cached_tokens
    out: list[Metric] = []
    for name, doc, value in (
            ("prompt_tokens", "Number of prompt tokens processed, excluding cached tokens",
             evaluated),
            ("prompt_tokens_cached", "Number of prompt tokens reused from the cache",
             mt.cached_tokens),
            ("prompt_seconds", "Total time spent processing prompts", prefill_s),
            ("tokens_predicted", "Number of generation tokens processed",
             mt.completion_tokens),
            ("tokens_predicted_seconds", "Total time spent generating tokens", decode_s),
            ("n_decode", "Total number of sequence decode steps", mt.completion_tokens),
            ("spec_decode_num_draft_tokens", "Speculative: Total draft tokens generated", 0),
            ("spec_decode_num_accepted_tokens", "Speculative: Total draft tokens accepted "
             "by the target model", 0),
            ("spec_decode_num_drafts", "Speculative: Total speculative decoding "
             "verification steps", 0)):
        out.append(CounterMetricFamily(f"llamacpp:{name}", doc, value=value))
    busy = st.inflight_count()
    for name, doc, value in (
            ("n_tokens_max", "Largest observed sequence length (prompt + generation)",
             mt.tokens_max),
            ("prompt_tokens_seconds", "Average prompt throughput in tokens/s",
             evaluated / prefill_s if prefill_s else 0.0),
            ("predicted_tokens_seconds", "Average generation throughput in tokens/s",
             mt.completion_tokens / decode_s if decode_s else 0.0),
            ("requests_processing", "Number of requests processing", busy),
            ("requests_deferred", "Number of requests deferred", len(st.queue)),
            ("n_busy_slots_per_decode", "Busy slots now (requests held by workers)", busy)):
        out.append(GaugeMetricFamily(f"llamacpp:{name}", doc, value=value))
    return out
