"""What the server benchmarks share (``benchmarks.frontend``, ``benchmarks.dataplane``).

- the emulated cluster they all measure (NODES x GPUS_PER_NODE ranks of MODEL) and the
  cached setup under ``--work``: the ESFT per-label profile, a placement solved by
  ``moe-scheduler place`` and a predictor bundle (:func:`prepare`); real prompts
  (:func:`load_prompts`);
- processes: ``moe-scheduler emulate`` / ``serve`` and SGLang's router, each its own
  process on 127.0.0.1 with its port read back from its startup line
  (:func:`start_emulator`, :func:`write_config` + :func:`start_scheduler`,
  :func:`start_router`), and what /proc says of them (:func:`cpu_seconds`,
  :func:`peak_rss_mib`);
- load generation: a :class:`Target` sends request ``i`` (HTTP ``/generate``, OpenAI
  ``/v1/chat/completions``, gRPC ``Generate``), driven open loop (:func:`open_loop`,
  :func:`steady_load`) or closed loop (:func:`closed_loop`), with the percentile helpers
  the records use.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import random
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from scheduler.processes import Child, spawn

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent

#: The emulated cluster: DeepSeek-V2-Lite on 4 nodes x 2 GPUs.
NODES, GPUS_PER_NODE = 4, 2
NUM_RANKS = NODES * GPUS_PER_NODE
MODEL = "deepseek-v2-lite"
MAX_PROMPT_CHARS = 1000
STARTUP_TIMEOUT_S = 60.0
OUR_POLICY = "locality_window"


def eprint(message: str) -> None:
    """Progress on stderr (stdout stays for what a benchmark prints as its result)."""
    print(message, file=sys.stderr, flush=True)


def run_step(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()``'s record with its status and seconds; an exception is recorded as data
    (its traceback on stderr), so the benchmark's other steps still run."""
    eprint(f"[{name}] ...")
    start = time.perf_counter()
    try:
        out = {"status": "ok", **fn()}
    except Exception as e:
        out = {"status": "error", "message": f"{type(e).__name__}: {e}"}
        eprint(traceback.format_exc())
    out["seconds"] = time.perf_counter() - start
    eprint(f"[{name}] {out['status']} in {out['seconds']:.1f} s")
    return out


# --------------------------------------------------------------------------- measurements


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a process, from /proc (None where unavailable)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def ms(seconds: float) -> float:
    return round(1e3 * seconds, 3)


def percentiles_ms(latencies: list[float]) -> dict[str, float | None]:
    if not latencies:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    a = np.asarray(latencies)
    return {
        "p50": ms(float(np.percentile(a, 50))),
        "p90": ms(float(np.percentile(a, 90))),
        "p99": ms(float(np.percentile(a, 99))),
        "mean": ms(float(a.mean())),
    }


def status_mib(pid: int, field: str) -> float | None:
    """A memory field of ``/proc/PID/status`` (``VmHWM``, ``VmRSS``) in MiB, or None where
    /proc (or the process) is unavailable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM of a running process (None where /proc is unavailable)."""
    return status_mib(pid, "VmHWM")


def error_text(e: BaseException) -> str:
    code = getattr(e, "code", None)
    if callable(code) and callable(getattr(e, "details", None)):  # grpc.aio.AioRpcError
        return f"gRPC {code().name}: {e.details()}"  # type: ignore[attr-defined]
    return f"{type(e).__name__}: {e}".replace("\n", " ")


# --------------------------------------------------------------------------- setup


def load_prompts(data: Path, count: int, seed: int) -> list[str]:
    """``count`` real prompts (at most MAX_PROMPT_CHARS characters), a seeded sample
    spread over the corpus's four domains."""
    pool: list[str] = []
    for domain in ("code", "math", "chat", "general"):
        path = data / "prompts" / domain / f"{domain}_prompts.jsonl.gz"
        with gzip.open(path, "rt", encoding="utf-8") as f:
            pool += [
                text
                for text in (json.loads(line)["prompt"] for line in f)
                if text.strip() and len(text) <= MAX_PROMPT_CHARS
            ]
    rng = random.Random(seed)
    return rng.sample(pool, min(count, len(pool)))


def _run(command: list[str], log: Path) -> None:
    with log.open("w") as f:
        subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True)


def prepare(data: Path, work: Path, quick: bool) -> dict[str, Any]:
    """Profile, placement and predictor bundle under ``work`` (reused when present)."""
    work.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "scheduler"]
    profile = work / "esft.profile.json"
    if not profile.is_file():
        traces = data / "traces" / "esft-deepseek-v2-lite"
        _run(
            [*cli, "profile", str(traces), "--by", "label", "--out", str(profile)],
            work / "profile.log",
        )
    placement = work / ("placement-4x2-quick" if quick else "placement-4x2")
    if not (placement / "plan.json").is_file():
        topology = ROOT / "deploy" / "topologies" / "4x2.toml"
        _run(
            [
                *cli,
                "place",
                "--profile",
                str(profile),
                "--topology",
                str(topology),
                "--method",
                "ours",
                "--time-limit",
                "1" if quick else "5",
                "--out",
                str(placement),
            ],
            work / "place.log",
        )
    if quick:
        bundle = work / "predictors-quick.npz"
        how = "small classifier on 2,000 corpus prompts (quick mode)"
        if not bundle.is_file():
            _quick_bundle(data, bundle)
    else:
        bundle = work / "predictors.npz"
        how = "`moe-scheduler fit --data DATA` (cached)"
        if not bundle.is_file():
            eprint("frontend benchmark: fitting the predictor bundle (about a minute, cached)")
            _run([*cli, "fit", "--data", str(data), "--out", str(bundle)], work / "fit.log")
    return {"profile": profile, "placement": placement, "bundle": bundle, "bundle_from": how}


def _quick_bundle(data: Path, path: Path) -> None:
    from scheduler.prediction.bundle import PredictorBundle, save_bundle
    from scheduler.prediction.text_classifier import TextClassifier

    texts, labels = [], []
    for domain in ("code", "math", "chat", "general"):
        with gzip.open(data / "prompts" / domain / f"{domain}_prompts.jsonl.gz", "rt") as f:
            for n, line in enumerate(f):
                if n == 500:
                    break
                texts.append(json.loads(line)["prompt"])
                labels.append(domain)
    save_bundle(PredictorBundle(domain=TextClassifier().fit(texts, labels)), path)


def default_data() -> Path:
    env = os.environ.get("MOE_SCHEDULER_DATA")
    return Path(env) if env else ROOT.parent / "shared" / "data"


# --------------------------------------------------------------------------- processes


#: A started child process (its address and other endpoints once ready).
Proc = Child


def start_emulator(
    time_scale: float, placement: Path, data: Path, log_dir: Path, *,
    capacity: int = 64, port: int = 0, log_name: str | None = None,
) -> Proc:  # fmt: skip
    """``moe-scheduler emulate`` on 127.0.0.1 (``port`` 0: a free one, read back)."""
    command = [
        sys.executable, "-m", "scheduler", "emulate", "--nodes", str(NODES),
        "--gpus-per-node", str(GPUS_PER_NODE), "--model", MODEL,
        "--init-expert-location", str(placement / "expert_location.json"),
        "--port", str(port), "--time-scale", str(time_scale), "--capacity", str(capacity),
        "--data", str(data), "--shutdown-grace", "1",
    ]  # fmt: skip
    proc = spawn(log_name or f"emulator-ts{time_scale:g}", command, log_dir, ROOT)
    listening = proc.wait_for(r"listening on http://127\.0\.0\.1:(\d+)", STARTUP_TIMEOUT_S)
    proc.address = f"http://127.0.0.1:{listening}"
    return proc


def write_config(
    path: Path, backend: str, setup: dict[str, Any], policy: str, window_ms: float,
    mode: str, *, routed: bool = True, probe_min_new_tokens: int = 256, capacity: int = 32,
) -> Path:  # fmt: skip
    """A scheduler.toml on free loopback ports (gRPC, metrics and the OpenAI listener);
    ``capacity``: policy.capacity per rank."""
    sections: dict[str, dict[str, Any]] = {
        "server": {
            "listen": "127.0.0.1:0",
            "metrics_listen": "127.0.0.1:0",
            "openai_listen": "127.0.0.1:0",
            "max_queue": 4096,
        },
        "backend": {"url": backend, "return_routed_experts": routed, "retries": 2},
        "cluster": {"placement": str(setup["placement"])},
        "policy": {"name": policy, "capacity": capacity, "window_ms": window_ms},
        "prediction": {
            "mode": mode,
            "bundle": str(setup["bundle"]),
            "profile": str(setup["profile"]),
            "probe_min_new_tokens": probe_min_new_tokens,
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(sections), encoding="utf-8")
    return path


def start_scheduler(config: Path, log_dir: Path) -> Proc:
    command = [sys.executable, "-m", "scheduler", "serve", "--config", str(config)]
    proc = spawn(config.stem, command, log_dir, ROOT)
    target = proc.wait_for(r"grpc listening on (\S+)\n", STARTUP_TIMEOUT_S)
    proc.address = target
    for key, line in (("metrics_url", "metrics on"), ("openai_url", "openai listening on")):
        proc.extra[key] = proc.wait_for(rf"{line} (\S+)\n", STARTUP_TIMEOUT_S)
    asyncio.run(_wait_scheduler_ready(target))
    return proc


async def _wait_scheduler_ready(target: str) -> None:
    """The first Generate that succeeds (the scheduler must have seen the backend)."""
    import grpc

    from scheduler.client import SchedulerClient

    async with SchedulerClient(target) as client:
        await client.wait_ready(STARTUP_TIMEOUT_S)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            try:
                await client.generate("hello", max_new_tokens=1, timeout=5)
                return
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def router_available() -> str | None:
    """None when sglang_router can be launched, else why not."""
    try:
        import sglang_router  # noqa: F401
    except ImportError as e:
        return f"sglang_router is not importable ({e}); install the `bench` extra"
    return None


def start_router(backend: str, log_dir: Path) -> Proc:
    port = free_port()
    command = [
        sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", backend,
        "--policy", "round_robin", "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "warn",
    ]  # fmt: skip
    proc = spawn("sglang-router", command, log_dir, ROOT)
    proc.address = f"http://127.0.0.1:{port}"
    asyncio.run(_wait_http_generate(proc))
    return proc


async def _wait_http_generate(proc: Proc) -> None:
    import aiohttp

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    body = {"text": "hello", "sampling_params": {"max_new_tokens": 1}}
    async with aiohttp.ClientSession() as session:
        while True:
            if proc.process.poll() is not None:
                err = proc.err.read_text(errors="replace")
                raise RuntimeError(f"sglang-router exited: {err[-2000:]}")
            try:
                async with session.post(f"{proc.address}/generate", json=body) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("sglang-router did not answer /generate with 200")
            await asyncio.sleep(0.2)


def openai_check(url: str) -> str | None:
    """None when ``url`` serves a unary ``POST /v1/chat/completions`` (the model from its
    ``GET /v1/models``, one request of 1 token answered 200 in full), else why not."""

    async def go() -> None:
        async with OpenAITarget(url, ["hello"], 1, rank=False) as target:
            await target.send(0)

    try:
        asyncio.run(go())
    except Exception as e:
        return f"POST /v1/chat/completions through it failed: {error_text(e)}"
    return None


# --------------------------------------------------------------------------- load generators


class Target:
    """One way to send a request: ``send(i)`` serves prompt ``i`` and raises on failure;
    ``api``: the request kind, recorded on each row ("generate": HTTP /generate, "grpc":
    gRPC Generate, "openai": HTTP /v1/chat/completions)."""

    api = ""

    async def __aenter__(self) -> Target:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def send(self, i: int) -> None:
        raise NotImplementedError


class _AiohttpTarget(Target):
    """One keep-alive aiohttp session to ``url``; ``rank``: set ``routed_dp_rank`` round
    robin (the emulator directly), else leave the rank to the server (scheduler, router)."""

    def __init__(self, url: str, prompts: list[str], max_new_tokens: int, rank: bool) -> None:
        self.url, self.prompts, self.max_new_tokens = url, prompts, max_new_tokens
        self.rank = rank
        self.session: Any = None

    async def __aenter__(self) -> _AiohttpTarget:
        import aiohttp

        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(total=60),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def _post(self, path: str, body: dict[str, Any], i: int) -> Any:
        """The JSON answer of ``POST url+path``; raises on any status but 200."""
        if self.rank:
            body["routed_dp_rank"] = i % NUM_RANKS
        async with self.session.post(f"{self.url}{path}", json=body) as response:
            payload = await response.json(content_type=None)
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {str(payload)[:200]}")
            return payload


class HttpTarget(_AiohttpTarget):
    """SGLang's native ``POST /generate``; ``routed``: ask for the routed experts."""

    api = "generate"

    def __init__(
        self, url: str, prompts: list[str], max_new_tokens: int, routed: bool, rank: bool
    ) -> None:
        super().__init__(url, prompts, max_new_tokens, rank)
        self.routed = routed

    async def send(self, i: int) -> None:
        body: dict[str, Any] = {
            "text": self.prompts[i % len(self.prompts)],
            "sampling_params": {"max_new_tokens": self.max_new_tokens},
        }
        if self.routed:
            body["return_routed_experts"] = True
        payload = await self._post("/generate", body, i)
        if payload["meta_info"]["completion_tokens"] != self.max_new_tokens:
            raise RuntimeError("short answer")


class OpenAITarget(_AiohttpTarget):
    """Unary OpenAI ``POST /v1/chat/completions``: one user message (the prompt),
    ``max_tokens`` = the benchmark's max new tokens, ``model`` = the first one the
    server's ``GET /v1/models`` lists (read once, at the start)."""

    api = "openai"

    async def __aenter__(self) -> OpenAITarget:
        await super().__aenter__()
        async with self.session.get(f"{self.url}/v1/models") as response:
            payload = await response.json(content_type=None)
            if response.status != 200 or not payload.get("data"):
                raise RuntimeError(f"GET /v1/models: HTTP {response.status}: {payload}")
        self.model = str(payload["data"][0]["id"])
        return self

    async def send(self, i: int) -> None:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": self.prompts[i % len(self.prompts)]}],
            "max_tokens": self.max_new_tokens,
        }
        payload = await self._post("/v1/chat/completions", body, i)
        if payload["usage"]["completion_tokens"] != self.max_new_tokens:
            raise RuntimeError("short answer")


class GrpcTarget(Target):
    api = "grpc"

    def __init__(self, address: str, prompts: list[str], max_new_tokens: int) -> None:
        self.address, self.prompts, self.max_new_tokens = address, prompts, max_new_tokens
        self.client: Any = None

    async def __aenter__(self) -> GrpcTarget:
        from scheduler.client import SchedulerClient

        self.client = SchedulerClient(self.address)
        await self.client.wait_ready(STARTUP_TIMEOUT_S)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()

    async def send(self, i: int) -> None:
        reply = await self.client.generate(
            self.prompts[i % len(self.prompts)], max_new_tokens=self.max_new_tokens, timeout=60
        )
        if reply.info.completion_tokens != self.max_new_tokens:
            raise RuntimeError("short answer")


def arrival_offsets(rate: float, seconds: float, arrivals: str, seed: int) -> np.ndarray:
    n = max(1, int(round(rate * seconds)))
    if arrivals == "even":
        return np.arange(n) / rate
    gaps = np.random.default_rng(seed).exponential(1 / rate, size=n)
    return np.cumsum(gaps) - gaps[0]


async def open_loop(target: Target, offsets: np.ndarray, first: int = 0) -> dict[str, Any]:
    """Send request ``first + k`` at ``offsets[k]`` seconds whatever the answers; latency
    from the moment it is sent; ``send_lag``: how late the generator sent it. (The other
    open-loop generator, :func:`steady_load`, says why there are two.)"""
    latencies: list[float] = []
    lags: list[float] = []
    errors: list[str] = []

    async def one(i: int) -> None:
        sent = time.perf_counter()
        try:
            await target.send(i)
            latencies.append(time.perf_counter() - sent)
        except Exception as e:  # counted, not raised
            errors.append(error_text(e))

    tasks = []
    cpu0 = time.process_time()
    start = time.perf_counter() + 0.01
    for k, offset in enumerate(offsets):
        due = start + float(offset)
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        lags.append(max(0.0, time.perf_counter() - due))
        tasks.append(asyncio.create_task(one(first + k)))
    sending = time.perf_counter() - start
    await asyncio.gather(*tasks)
    return {
        "latencies": latencies,
        "errors": errors,
        "send_seconds": sending,
        "seconds": time.perf_counter() - start,
        "lags": lags,
        "client_cpu_s": time.process_time() - cpu0,
    }


async def steady_load(target: Target, rate: float, until: Callable[[], bool]) -> None:
    """Evenly spaced calls at ``rate`` until ``until()``, then wait for all to end.

    The other open-loop generator. :func:`open_loop` sends a schedule fixed in advance
    (``offsets``, from :func:`arrival_offsets`) and measures each request itself
    (latency, send lag, the generator's CPU); this one stops on a condition known only
    while it runs (``benchmarks.dataplane``'s backend restart: "until
    ``--restart-after-s`` after the new emulator listens"), starts at once, numbers calls
    from 0 and leaves all measurement to ``target`` (``send`` must not raise: a
    ``dataplane.Calls`` records every outcome itself)."""
    tasks: list[asyncio.Task[None]] = []
    start = time.perf_counter()
    while not until():
        delay = start + len(tasks) / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(target.send(len(tasks))))
    await asyncio.gather(*tasks)


async def closed_loop(target: Target, concurrency: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    stop_at = time.perf_counter() + seconds
    counter = iter(range(10**9))

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            sent = time.perf_counter()
            try:
                await target.send(next(counter))
                latencies.append(time.perf_counter() - sent)
            except Exception as e:
                errors.append(error_text(e))

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {
        "latencies": latencies,
        "errors": errors,
        "seconds": time.perf_counter() - wall0,
        "client_cpu_s": time.process_time() - cpu0,
    }
