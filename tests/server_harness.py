"""Run a scheduler server (gRPC + metrics) on ephemeral loopback ports in a background
thread, in front of an emulator from :mod:`emulator_harness`."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import tomli_w

from scheduler.emulator.expert_location import trivial_location
from scheduler.emulator.workload import DEFAULT_PROFILE
from scheduler.placement.io import EXPERT_LOCATION, PLAN, to_sglang
from scheduler.placement.placement import Placement
from scheduler.prediction.bundle import PredictorBundle, save_bundle
from scheduler.prediction.text_classifier import TextClassifier
from scheduler.profile import load_profile
from scheduler.server.app import RunningServer, start_server
from scheduler.server.config import load_config
from tests.emulator_harness import MODEL, STARTUP_TIMEOUT_S

CLASSES = ("translation", "law", "intent", "summary")  # the default profile's ESFT classes

#: Tiny labelled prompts: enough for the classifier to tell the four domains apart.
PROMPTS = {
    "code": [
        "def add(a, b): return a + b",
        "write a python function to sort a list",
        "fix this javascript bug in the loop",
        "implement quicksort in C++",
    ],
    "math": [
        "solve 2x + 3 = 7 for x",
        "what is the integral of x^2",
        "compute 17 * 23",
        "prove that the square root of 2 is irrational",
    ],
    "chat": [
        "hi, how are you today?",
        "tell me a joke please",
        "what's up my friend",
        "good morning! how was your weekend",
    ],
    "general": [
        "summarize the history of the roman empire",
        "explain how vaccines work",
        "what is the capital of france",
        "describe the water cycle",
    ],
}


def write_placement(
    directory: Path, nodes: int, gpus_per_node: int, placement: Placement | None = None
) -> Path:
    """A placement directory (trivial unless given) with a uniform plan."""
    directory.mkdir(parents=True, exist_ok=True)
    placement = placement or trivial_location(MODEL, nodes * gpus_per_node, gpus_per_node)
    (directory / EXPERT_LOCATION).write_text(json.dumps(to_sglang(placement, MODEL)))
    share = [round(1 / nodes, 6)] * nodes
    share[-1] = round(1 - sum(share[:-1]), 6)
    plan = {
        "format": "moe-scheduler-plan",
        "version": 1,
        "method": "test",
        "class_to_node_share": {c: share for c in CLASSES},
        "cluster": {"nodes": nodes, "gpus_per_node": gpus_per_node},
        "model": MODEL.to_dict(),
    }
    (directory / PLAN).write_text(json.dumps(plan))
    return directory


def write_bundle(path: Path) -> Path:
    texts = [t for ts in PROMPTS.values() for t in ts]
    labels = [d for d, ts in PROMPTS.items() for _ in ts]
    save_bundle(PredictorBundle(domain=TextClassifier().fit(texts, labels)), path)
    return path


def write_config(
    tmp: Path, backend_url: str, *, nodes: int = 2, gpus_per_node: int = 2, **sections: Any
) -> Path:
    """scheduler.toml in ``tmp`` (placement, profile, bundle beside it); ``sections``:
    section name -> dict of keys overriding the defaults below."""
    placement = tmp / "placement"
    if not placement.exists():
        write_placement(placement, nodes, gpus_per_node)
    bundle = tmp / "bundle.npz"
    if not bundle.exists():
        write_bundle(bundle)
    assert load_profile(DEFAULT_PROFILE).model == MODEL
    values: dict[str, dict[str, Any]] = {
        # CI has 2 cores shared with the emulators: a loop that runs late there must not
        # shed the calls a test is about (the lag guard has its own test).
        "server": {
            "listen": "127.0.0.1:0",
            "metrics_listen": "127.0.0.1:0",
            "max_loop_lag_ms": 60000.0,
        },
        "backend": {
            "url": backend_url,
            "health_interval_s": 0.2,
            "retries": 2,
            "failed_rank_cooldown_s": 30.0,
        },
        "cluster": {"placement": str(placement)},
        "policy": {"name": "total_requests", "capacity": 4, "window_ms": 0.0},
        "prediction": {"mode": "text", "bundle": str(bundle), "profile": str(DEFAULT_PROFILE)},
        "feedback": {"dir": str(tmp / "feedback"), "flush_interval_s": 0.5},
    }
    for name, keys in sections.items():
        values.setdefault(name, {}).update(keys)
    instances = values["backend"].pop("instances", None)
    if instances is not None:  # [[backend.instances]] instead of backend.url + cluster.placement
        del values["backend"]["url"], values["cluster"]["placement"]
        values["backend"]["instances"] = [
            {k: str(v) if isinstance(v, Path) else v for k, v in table.items()}
            for table in instances
        ]
    path = tmp / "scheduler.toml"
    path.write_text(tomli_w.dumps(values))
    return path


class SchedulerServer:
    """``with SchedulerServer(config_path) as s:`` serves on ``s.target`` until exit."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.running: RunningServer | None = None
        self.target = ""
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self.running = await start_server(load_config(self.config_path))
            self.target = self.running.grpc_address
            self._ready.set()
            await self._stop.wait()
            await self.running.stop(1.0)

        try:
            asyncio.run(main())
        except BaseException as e:
            self._error = e
            self._ready.set()

    def call(self, fn: Any) -> Any:
        """Run ``fn()`` on the server's loop and return its result (thread-safe)."""
        assert self.loop is not None

        async def wrapper() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(STARTUP_TIMEOUT_S)

    def __enter__(self) -> SchedulerServer:
        self._thread.start()
        if not self._ready.wait(STARTUP_TIMEOUT_S) or self._error is not None:
            raise RuntimeError(f"scheduler did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(STARTUP_TIMEOUT_S)
        assert not self._thread.is_alive(), "scheduler thread did not stop"
        if self._error is not None:
            raise self._error
