"""The GPU checklist: every GPU figure docs/gpu.md asks for, measured in one run, as one JSON.

    python -m llmctl.tools.gpu_checklist [--model M.gguf] [--out gpu-checklist.json]
        [--llama-server PATH] [--skip bench,breach,...]

On a host with an NVIDIA GPU, the CUDA build of llama-cpp-python (``LLMCTL_CUDA=1 make
setup``) and the model, it runs, each step on its own fresh service (free ports, its own
run_dir, always stopped):

1. ``device``: the card (NVML: name, compute capability, driver, memory);
2. ``offload``: the model loaded with every layer on the GPU: llama.cpp's
   ``offloaded N/N layers to GPU`` line and its CUDA0 model / KV / compute buffers;
3. ``plan``: NVML's per-process VRAM of each worker for 1, 2 and 4 workers (1 slot) and
   for 1 and 8 slots (1 worker) against the plan (``llmctl check``): error in %, and the
   ``cuda_overhead_mb`` that would make the plan exact where it is off by more than 10 %;
4. ``budget``: a service that fits the 1 GB budget stays within it under load; a config
   that cannot fit is refused by ``llmctl check`` and ``llmctl start``;
5. ``breach``: a plan told there is no CUDA overhead under a budget just above it: the
   real use breaches it at run time, and ``on_breach = restart_largest`` acts;
6. ``kv``: a worker's VRAM with the KV cache in f16 and in q8_0 (8 slots, n_ctx 8192),
   and tools/kv_cache_measure.py with every layer on the GPU (KV MiB, tok/s, agreement);
7. ``bench``: ``llmctl bench --compare`` against llama-server built with CUDA from the same
   llama.cpp (``--llama-server``, or tools/build_llama_server.sh's CUDA build in
   ~/.cache/llmctl/llama-server-cuda) at 1, 8 and 64 clients.

Without a GPU it says so and exits 2 (the JSON then holds only ``refused``).  A step that
fails is recorded with its error and the others still run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from llmctl.common.procs import terminate_popen
from llmctl.tools.service_status import free_port, gateway_address, serving, status

MODEL = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
RECALIBRATE_PCT = 10.0
STEPS = ("device", "offload", "plan", "budget", "kv", "breach", "bench")
LLAMA_SERVER = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) \
    / "llmctl" / "llama-server-cuda" / "bin" / "llama-server"

OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
BUFFER = re.compile(r"(\S+) (model|KV|compute) buffer size\s*=\s*([\d.]+) MiB")
PLAN_TOTAL = re.compile(r"total\s+per worker = ([\d,]+) B")


# ---- pure parts ------------------------------------------------------------------------------

def parse_offload(log: str) -> dict[str, Any]:
    """llama.cpp's load log -> layers offloaded and the buffers (MiB) per device and kind."""
    m = OFFLOADED.search(log)
    buffers: dict[str, float] = {}
    for dev, kind, mib in BUFFER.findall(log):
        key = f"{dev} {kind}"
        buffers[key] = round(buffers.get(key, 0.0) + float(mib), 2)
    return {"offloaded": int(m.group(1)) if m else None, "layers": int(m.group(2)) if m else None,
            "all_on_gpu": bool(m) and m.group(1) == m.group(2), "buffers_mib": buffers}


def plan_mib(check_output: str) -> float | None:
    """The per-worker total of ``llmctl check``'s plan (MiB)."""
    m = PLAN_TOTAL.search(check_output)
    return round(int(m.group(1).replace(",", "")) / 2**20, 1) if m else None


def compare(measured_mib: float, planned_mib: float, overhead_mb: int) -> dict[str, Any]:
    """Measured against planned per worker: error in % of the measurement, and the
    cuda_overhead_mb that would make the plan exact when it is off by more than 10 %."""
    err = (planned_mib - measured_mib) / measured_mib * 100 if measured_mib else None
    out: dict[str, Any] = {"measured_mib": round(measured_mib, 1), "plan_mib": planned_mib,
                           "error_pct": None if err is None else round(err, 1)}
    out["recalibrate"] = err is not None and abs(err) > RECALIBRATE_PCT
    if out["recalibrate"]:
        out["suggested_cuda_overhead_mb"] = max(0, round(overhead_mb + measured_mib - planned_mib))
    return out


def config_text(model: str, run_dir: str, *, workers: int = 1, slots: int = 1,
                n_ctx: int = 2048, budget_mb: int = 1 << 20, cache_type: str = "f16",
                on_breach: str = "alert", cuda_overhead_mb: int | None = None,
                compute_buffer_mb: int | None = None) -> str:
    """A one-model config on free ports (0) in run_dir."""
    gpu = [f"vram_budget_mb = {budget_mb}", f'on_breach = "{on_breach}"', "sample_interval_s = 0.5"]
    if cuda_overhead_mb is not None:
        gpu.append(f"cuda_overhead_mb = {cuda_overhead_mb}")
    if compute_buffer_mb is not None:
        gpu.append(f"compute_buffer_mb = {compute_buffer_mb}")
    return (f'[model]\npath = "{os.path.abspath(model)}"\nn_ctx = {n_ctx}\nn_gpu_layers = -1\n'
            f'cache_type_k = "{cache_type}"\ncache_type_v = "{cache_type}"\n'
            f"[workers]\ncount = {workers}\nslots = {slots}\n"
            f'[gateway]\nport = 0\n[control]\nrun_dir = "{run_dir}"\n'
            "[gpu]\n" + "\n".join(gpu) + "\n")


def no_gpu_reason() -> str | None:
    """Why this host cannot run the checklist (None: it can)."""
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            if pynvml.nvmlDeviceGetCount() < 1:
                return "NVML sees no NVIDIA GPU"
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:      # the library, the driver or the device is missing
        return f"no NVIDIA GPU: NVML: {exc}"
    r = subprocess.run([sys.executable, "-c", "import llama_cpp, sys; "
                        "sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)"],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        return ("this llama-cpp-python has no GPU offload (a CPU build, or CUDA that finds no "
                "device): LLMCTL_CUDA=1 make setup")
    return None


# ---- the steps ---------------------------------------------------------------------------------

def llmctl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmctl.control", *args],
                          capture_output=True, text=True, timeout=timeout)


class Service:
    """One llmctl service from a config text, stopped on exit whatever happened."""

    def __init__(self, text_of: Callable[[str], str]) -> None:
        self.dir = tempfile.mkdtemp(prefix="llmctl-gpu-")
        self.config = os.path.join(self.dir, "c.toml")
        Path(self.config).write_text(text_of(os.path.join(self.dir, "run")))
        self.start: subprocess.CompletedProcess | None = None

    def __enter__(self) -> "Service":
        self.start = llmctl("start", "-c", self.config, timeout=600)
        return self

    def __exit__(self, *exc: Any) -> None:
        llmctl("stop", "-c", self.config, timeout=120)
        shutil.rmtree(self.dir, ignore_errors=True)

    def status(self) -> dict[str, Any]:
        return status(self.config)

    def gpu(self, settle_s: float = 3.0) -> dict[str, Any]:
        """The supervisor's VRAM sample once every worker serves and the readings settle."""
        deadline = time.monotonic() + 120
        st = self.status()
        while not serving(st) and time.monotonic() < deadline:
            time.sleep(0.5)
            st = self.status()
        time.sleep(settle_s)         # one sample after warm-up (sample_interval_s 0.5)
        return self.status().get("gpu") or {}

    def plan(self) -> float | None:
        return plan_mib(llmctl("check", "-c", self.config).stdout)


def step_device() -> dict[str, Any]:
    import pynvml
    pynvml.nvmlInit()
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(h)
        cc = pynvml.nvmlDeviceGetCudaComputeCapability(h)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        return {"name": name.decode() if isinstance(name, bytes) else name,
                "compute_capability": f"{cc[0]}.{cc[1]}",
                "driver": pynvml.nvmlSystemGetDriverVersion(),
                "total_mib": mem.total >> 20, "used_mib_before": mem.used >> 20,
                "count": pynvml.nvmlDeviceGetCount()}
    finally:
        pynvml.nvmlShutdown()


def step_offload(model: str) -> dict[str, Any]:
    code = ("import llama_cpp; llama_cpp.Llama(model_path=%r, n_gpu_layers=-1, n_ctx=2048, "
            "n_batch=63, verbose=True)" % model)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    out = parse_offload(r.stderr)
    out["log"] = [ln for ln in r.stderr.splitlines() if OFFLOADED.search(ln) or BUFFER.search(ln)
                  or "CUDA" in ln and "device" in ln][:20]
    return out


def step_plan(model: str) -> dict[str, Any]:
    rows = []
    for workers, slots in ((1, 1), (2, 1), (4, 1), (1, 8)):
        with Service(lambda run: config_text(model, run, workers=workers, slots=slots)) as s:
            g, planned = s.gpu(), s.plan()
            per = list((g.get("workers") or {}).values())
            measured = sum(per) / len(per) if per else 0.0
            rows.append({"workers": workers, "slots": slots, "per_worker_mib": per,
                         "device_used_mib": g.get("device_used_mib"),
                         **compare(measured, planned or 0.0, 150)})
    return {"rows": rows, "recalibrate": any(r["recalibrate"] for r in rows)}


def step_budget(model: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with Service(lambda run: config_text(model, run, workers=2, slots=1, budget_mb=1024)) as s:
        g = s.gpu()
        host, port = gateway_address(s.status())
        bench = subprocess.run([sys.executable, "-m", "llmctl.tools.bench", "--target",
                                f"tcp://{host}:{port}", "--clients", "8", "--requests", "32",
                                "--max-tokens", "64"], capture_output=True, text=True, timeout=600)
        after = s.status().get("gpu") or {}
        out["fits"] = {"start": s.start.returncode if s.start else None,
                       "total_mib_idle": g.get("total_mib"),
                       "total_mib_after_load": after.get("total_mib"),
                       "breach": after.get("breach"), "bench_rc": bench.returncode,
                       "held": bool(after.get("total_mib")) and after["total_mib"] <= 1024}
    with Service(lambda run: config_text(model, run, workers=4, slots=8, n_ctx=8192,
                                         budget_mb=1024)) as s:
        chk = llmctl("check", "-c", s.config)
        out["refused"] = {"check_rc": chk.returncode,
                          "check_says": (chk.stderr or chk.stdout).strip().splitlines()[-3:],
                          "start_rc": s.start.returncode if s.start else None,
                          "start_says": (s.start.stderr or s.start.stdout).strip()
                          .splitlines()[-2:] if s.start else None}
    return out


def step_breach(model: str) -> dict[str, Any]:
    """cuda_overhead_mb 0 and a tiny compute buffer: the plan fits a budget that the real
    use (the CUDA context alone is ~100 MiB or more) cannot."""
    probe = Service(lambda run: config_text(model, run, cuda_overhead_mb=0, compute_buffer_mb=0))
    planned = probe.plan()
    shutil.rmtree(probe.dir, ignore_errors=True)
    budget = int((planned or 100) + 16)
    with Service(lambda run: config_text(model, run, budget_mb=budget, cuda_overhead_mb=0,
                                         compute_buffer_mb=0,
                                         on_breach="restart_largest")) as s:
        first = {w["name"]: w.get("pid") for w in s.status().get("workers", [])}
        deadline, seen, restarted = time.monotonic() + 60, False, False
        while time.monotonic() < deadline and not restarted:
            st = s.status()
            seen = seen or bool((st.get("gpu") or {}).get("breach"))
            now = {w["name"]: w.get("pid") for w in st.get("workers", [])}
            restarted = any(now.get(n) not in (None, p) for n, p in first.items())
            time.sleep(0.5)
        log = Path(s.dir, "run", "logs", "supervisor.log")
        lines = [ln for ln in log.read_text().splitlines() if "VRAM" in ln or "budget" in ln] \
            if log.exists() else []
        return {"plan_mib": planned, "budget_mb": budget, "breach_seen": seen,
                "worker_restarted": restarted, "gpu": st.get("gpu"), "log": lines[-6:]}


def step_kv(model: str, out_dir: str) -> dict[str, Any]:
    rows = {}
    for t in ("f16", "q8_0"):
        with Service(lambda run: config_text(model, run, slots=8, n_ctx=8192, cache_type=t)) as s:
            g, planned = s.gpu(), s.plan()
            per = list((g.get("workers") or {}).values())
            rows[t] = compare(per[0] if per else 0.0, planned or 0.0, 150)
    path = os.path.join(out_dir, "kv-gpu.json")
    r = subprocess.run([sys.executable, "-m", "llmctl.tools.kv_cache_measure", "--model", model,
                        "--n-gpu-layers", "-1", "--json", path], capture_output=True, text=True,
                       timeout=900)
    return {"nvml_8_slots_n_ctx_8192": rows,
            "saved_mib": round(rows["f16"]["measured_mib"] - rows["q8_0"]["measured_mib"], 1),
            "kv_cache_measure": json.loads(Path(path).read_text()) if r.returncode == 0
            else r.stderr[-2000:]}


def step_bench(model: str, server: str, out_dir: str) -> dict[str, Any]:
    if not os.access(server, os.X_OK):
        return {"skipped": f"no llama-server at {server}: CMAKE_ARGS='-DGGML_CUDA=on "
                           "-DCMAKE_CUDA_ARCHITECTURES=native' JOBS=16 bash "
                           "tools/build_llama_server.sh ~/.cache/llmctl/llama-server-cuda"}
    port = free_port()
    srv = subprocess.Popen([server, "-m", model, "--port", str(port), "-ngl", "99",
                            "--parallel", "8", "-c", str(8 * 2048), "-fa", "auto"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with Service(lambda run: config_text(model, run, slots=8)) as s:
            host, gport = gateway_address(s.status())
            path = os.path.join(out_dir, "bench-compare.json")
            r = subprocess.run([sys.executable, "-m", "llmctl.tools.bench", "--target",
                                f"tcp://{host}:{gport}", "--compare",
                                f"http://127.0.0.1:{port}/v1", "--clients", "1,8,64",
                                "--json", path], capture_output=True, text=True, timeout=1800)
            return {"rc": r.returncode, "report": r.stdout[-4000:],
                    "json": json.loads(Path(path).read_text()) if r.returncode == 0 else None}
    finally:
        terminate_popen(srv, 10)


def run(args: argparse.Namespace) -> dict[str, Any]:
    out_dir = os.path.dirname(os.path.abspath(args.out))
    steps: dict[str, Callable[[], dict[str, Any]]] = {
        "device": step_device, "offload": lambda: step_offload(args.model),
        "plan": lambda: step_plan(args.model), "budget": lambda: step_budget(args.model),
        "kv": lambda: step_kv(args.model, out_dir), "breach": lambda: step_breach(args.model),
        "bench": lambda: step_bench(args.model, args.llama_server, out_dir)}
    result: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for name in STEPS:
        if name in args.skip:
            continue
        t0 = time.monotonic()
        try:
            result[name] = steps[name]()
        except Exception as exc:     # one failed step must not lose the others' figures
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
        result[name]["seconds"] = round(time.monotonic() - t0, 1)
        print(f"{name}: {json.dumps(result[name])[:300]}", flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_checklist", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=MODEL)
    p.add_argument("--out", default="gpu-checklist.json")
    p.add_argument("--llama-server", default=str(LLAMA_SERVER))
    p.add_argument("--skip", type=lambda s: set(s.split(",")), default=set(),
                   help=f"comma-separated steps to leave out: {','.join(STEPS)}")
    args = p.parse_args(argv)
    why = no_gpu_reason()
    if why:
        print(f"gpu_checklist: refused: {why}; it measures a GPU and has nothing to do here",
              file=sys.stderr)
        Path(args.out).write_text(json.dumps({"refused": why}, indent=1))
        return 2
    run(args)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
