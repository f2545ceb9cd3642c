"""The ``python3 -m sglang.launch_server`` command of every node of a multi-node SGLang
cluster that serves a placement written by ``moe-scheduler place``.

Pure: values in, argv lists and text out; no files, no environment. The flags and their
semantics are those of SGLang 0.5.23; the version switches what its argparse would
refuse (:mod:`scheduler.sglang_versions`, docs/sglang-versions.md):

- attention data parallelism is ``--attn-dp-size N`` from 0.5.22 and
  ``--enable-dp-attention --dp-size N`` before (0.5.22 and 0.5.23 still accept the old
  spelling);
- ``--enable-return-routed-experts`` exists from 0.5.7 on;
- ``--schedule-policy routing-key`` is a valid choice from 0.5.8 on; before, it is left
  out and a note says what is lost;
- prefill/decode disaggregation (``--disaggregation-mode prefill|decode``, the prefill's
  ``--disaggregation-bootstrap-port``, ``--disaggregation-transfer-backend``) is in every
  checked version and refused for older ones.

A model whose SGLang class cannot take a placement (Mixtral) is refused; an expert
distribution recorder mode other than ``per_token`` gets ``--deepep-mode normal``, since
SGLang's recorder raises for it with DeepEP's default ``auto`` mode.

Layout (attention TP 1, ``ep_size == tp_size`` = every GPU): DP rank ``r`` runs on GPU
``r``, which is EP rank ``r`` and holds physical slots ``[r * L, (r + 1) * L)`` with
``L = slots / GPUs``; node ``n`` hosts ranks ``[n * G, (n + 1) * G)``. Only node 0 serves
HTTP, so only node 0 gets ``--host``/``--port`` and, when ``api_key_env`` names an
environment variable, ``--api-key`` from it: a reference, never the key (``"${NAME:?...}"``
in the shell listing, which stops when it is unset or empty; ``$(NAME)``, Kubernetes'
syntax, in argv). The other nodes only run a key-less health server
(``sglang/srt/utils/common.py:launch_dummy_health_check_server``).

A prefill or decode instance (``disaggregation_mode``) gets ``--disaggregation-mode`` on
every node; a prefill instance also ``--disaggregation-bootstrap-port`` on every node:
its bootstrap server runs on node 0, and up to 0.5.9 every prefill rank registers at
``<dist-init host>:<its own port>`` (``disaggregation/common/conn.py``; 0.5.22 and 0.5.23
broadcast node 0's port instead), so the nodes must agree.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from scheduler.errors import ConfigError
from scheduler.sglang_versions import (
    ATTN_DP_SIZE_SINCE,
    DEFAULT_BOOTSTRAP_PORT,
    DISAGG_PREFILL_DP_RANK_SINCE,
    DISAGGREGATION_SINCE,
    NEWEST_CHECKED,
    ROUTED_EXPERTS_SINCE,
    ROUTING_KEY_POLICY_SINCE,
    SglangVersion,
    check_expert_location,
)

#: The interpreter and module every node runs.
LAUNCH_PREFIX = ("python3", "-m", "sglang.launch_server")
#: The SGLang version the flags were checked against.
DEFAULT_SGLANG_VERSION = str(NEWEST_CHECKED)

#: Flags this module sets itself, with the other spellings SGLang's parser has for them;
#: passing them again through ``extra_args`` is refused, since SGLang would take the last
#: one and silently contradict the placement.
MANAGED_FLAGS = frozenset(
    {
        "--model-path",
        "--model",
        "--nnodes",
        "--node-rank",
        "--dist-init-addr",
        "--nccl-init-addr",
        "--tp-size",
        "--tensor-parallel-size",
        "--tp",
        "--ep-size",
        "--expert-parallel-size",
        "--ep",
        "--attn-dp-size",
        "--attention-data-parallel-size",
        "--dp-size",
        "--data-parallel-size",
        "--dp",
        "--enable-dp-attention",
        "--init-expert-location",
        "--ep-num-redundant-experts",
        "--ep-dispatch-algorithm",
        "--moe-a2a-backend",
        "--enable-return-routed-experts",
        "--schedule-policy",
        "--host",
        "--port",
        "--disaggregation-mode",
        "--disaggregation-bootstrap-port",
        "--disaggregation-transfer-backend",
    }
)

#: ``--disaggregation-mode`` values sglang-args emits (None: a mixed instance, SGLang's
#: ``null``, and no flag).
DISAGGREGATION_MODES = ("prefill", "decode")
#: A transfer backend name (SGLang's own argparse checks it against its choices).
_BACKEND_NAME = re.compile(r"[A-Za-z0-9_]+")

_HOST_PORT = re.compile(r"(?P<host>\S+):(?P<port>\d{1,5})")
#: An environment variable name a shell and Kubernetes both expand.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: The variable ``--api-key`` is read from by default.
DEFAULT_API_KEY_ENV = "SGLANG_API_KEY"

#: Expert-distribution recorder modes -> the ``--deepep-mode`` values they work with under
#: ``--moe-a2a-backend deepep`` (``_SinglePassGatherer.init_new`` in
#: ``python/sglang/srt/eplb/expert_distribution.py``, the same in every checked version):
#: ``per_token`` gathers from select_experts and works with any; ``stat`` and ``per_pass``
#: raise NotImplementedError for ``auto``, the default; ``stat_approx`` needs ``normal``.
RECORDER_DEEPEP_MODES: dict[str, tuple[str, ...]] = {
    "per_token": ("auto", "normal", "low_latency"),
    "stat": ("normal", "low_latency"),
    "per_pass": ("normal", "low_latency"),
    "stat_approx": ("normal",),
}
#: What sglang-args adds for a recorder mode that does not work with ``auto``.
RECORDER_DEEPEP_MODE = "normal"


def extra_arg_value(extra_args: tuple[str, ...], flag: str) -> str | None:
    """The value ``extra_args`` give ``flag`` (``--flag V`` or ``--flag=V``; the last one
    wins, as in argparse), or None."""
    value = None
    for i, arg in enumerate(extra_args):
        if arg == flag and i + 1 < len(extra_args):
            value = extra_args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def recorder_deepep_mode(extra_args: tuple[str, ...]) -> str | None:
    """The ``--deepep-mode`` to add for the recorder mode ``extra_args`` ask for (None:
    nothing to add), under the ``--moe-a2a-backend deepep`` every launch uses.

    Raises :class:`ConfigError` when ``extra_args`` also set a ``--deepep-mode`` that the
    recorder mode cannot run with: SGLang would stop at startup.
    """
    mode = extra_arg_value(extra_args, "--expert-distribution-recorder-mode")
    if mode not in RECORDER_DEEPEP_MODES:
        return None  # none, or a mode SGLang's own parser judges
    works = RECORDER_DEEPEP_MODES[mode]
    given = extra_arg_value(extra_args, "--deepep-mode")
    if given is None:
        return None if "auto" in works else RECORDER_DEEPEP_MODE
    if given not in works:
        raise ConfigError(
            f"--expert-distribution-recorder-mode {mode} with --moe-a2a-backend deepep "
            f"needs --deepep-mode {' or '.join(works)}, not {given}: SGLang's recorder "
            "raises NotImplementedError at startup; use per_token, or leave --deepep-mode "
            f"out (sglang-args then adds {RECORDER_DEEPEP_MODE})"
        )
    return None


def env_reference(name: str) -> str:
    """How argv refers to environment variable ``name``: ``$(NAME)``, which Kubernetes
    expands in container args (the shell listing writes ``"$NAME"`` instead)."""
    return f"$({name})"


def node_of_dp_rank(dp_rank: int, tp_size: int, attn_dp_size: int, nnodes: int) -> int:
    """The node that runs DP-attention rank ``dp_rank`` (attention CP 1).

    SGLang lays TP ranks out ``(dp, tp)``, tp fastest, and node ``n`` hosts TP ranks
    ``[n * tp_size / nnodes, (n + 1) * tp_size / nnodes)``, so the rank's first TP rank
    ``dp_rank * attn_tp_size`` decides its node (docs/sources.md, SGLang "DP rank to node").
    """
    if tp_size % attn_dp_size or tp_size % nnodes:
        raise ConfigError(
            f"tp size {tp_size} must be divisible by the attention DP size {attn_dp_size} "
            f"and by the number of nodes {nnodes}"
        )
    if not 0 <= dp_rank < attn_dp_size:
        raise ConfigError(f"DP rank {dp_rank} outside [0, {attn_dp_size})")
    attn_tp_size = tp_size // attn_dp_size
    return dp_rank * attn_tp_size // (tp_size // nnodes)


@dataclass(frozen=True)
class SglangLaunch:
    """One SGLang cluster launch: ``nodes`` x ``gpus_per_node`` GPUs, every GPU an
    attention-DP rank and an EP rank, serving a placement of ``num_slots`` physical
    slots per MoE layer for ``num_experts`` logical experts.

    ``expert_location`` is the path of ``expert_location.json`` as the nodes see it.
    ``dist_init_addr`` (``HOST:PORT`` of node 0) is required for more than one node.
    ``extra_args`` are appended to every node's command (for instance
    ``--enable-metrics``); they may not repeat a flag this class sets.
    ``api_key_env``: node 0 gets ``--api-key`` from this environment variable (None: no key).
    ``model_name`` (``ModelShape.name``): refused when its SGLang class cannot take a
    placement (:func:`~scheduler.sglang_versions.check_expert_location`); None: not checked.
    ``disaggregation_mode``: ``"prefill"``, ``"decode"`` or None (a mixed instance).
    ``disaggregation_bootstrap_port``: a prefill instance's bootstrap server port (None:
    SGLang's default 8998); refused for any other role. ``disaggregation_transfer_backend``:
    passed through (None: SGLang's default, mooncake); only with a disaggregation mode.
    """

    model_path: str
    nodes: int
    gpus_per_node: int
    num_experts: int
    num_slots: int
    expert_location: str
    version: SglangVersion = field(
        default_factory=lambda: SglangVersion.parse(DEFAULT_SGLANG_VERSION)
    )
    dist_init_addr: str | None = None
    host: str = "0.0.0.0"
    port: int = 30000
    extra_args: tuple[str, ...] = ()
    api_key_env: str | None = None
    model_name: str | None = None
    disaggregation_mode: str | None = None
    disaggregation_bootstrap_port: int | None = None
    disaggregation_transfer_backend: str | None = None

    def __post_init__(self) -> None:
        if self.api_key_env is not None and _ENV_NAME.fullmatch(self.api_key_env) is None:
            raise ConfigError(
                f"--api-key-env {self.api_key_env!r} must be an environment variable name "
                "(letters, digits and '_', not starting with a digit), e.g. SGLANG_API_KEY"
            )
        if not self.model_path.strip():
            raise ConfigError("--model-path must name the model (HF id or local directory)")
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ConfigError(
                f"the topology needs >= 1 node and >= 1 GPU per node, got "
                f"{self.nodes} x {self.gpus_per_node}"
            )
        if self.num_slots < self.num_experts:
            raise ConfigError(
                f"the placement has {self.num_slots} slots per layer, fewer than the model's "
                f"{self.num_experts} experts: it was made for another model"
            )
        if self.num_slots % self.num_gpus:
            raise ConfigError(
                f"the placement's {self.num_slots} slots per layer do not split evenly over "
                f"{self.num_gpus} GPUs ({self.nodes} x {self.gpus_per_node}): it was made for "
                "another topology"
            )
        if self.dist_init_addr is None:
            if self.nodes > 1:
                raise ConfigError(
                    f"--dist-init-addr HOST:PORT is required for {self.nodes} nodes: an "
                    "address of node 0 that every node reaches (a free port, not --port)"
                )
        else:
            match = _HOST_PORT.fullmatch(self.dist_init_addr)
            if match is None or not 0 < int(match["port"]) < 65536:
                raise ConfigError(
                    f"--dist-init-addr {self.dist_init_addr!r} must be HOST:PORT "
                    "(node 0's address, port in 1-65535)"
                )
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port {self.port} must be in 1-65535")
        if not self.host.strip():
            raise ConfigError("--host must not be empty (0.0.0.0 listens on every interface)")
        for arg in self.extra_args:
            flag = arg.split("=", 1)[0]
            if flag == "--api-key":
                raise ConfigError(
                    "--api-key in --extra-args would write the key itself into the command: "
                    "use --api-key-env NAME (default SGLANG_API_KEY) and set NAME on node 0"
                )
            if flag == "--enable-eplb":
                raise ConfigError(
                    "--enable-eplb is refused: SGLang's online EPLB would overwrite the "
                    "placement; re-place with `moe-scheduler place --current` instead"
                )
            if flag in MANAGED_FLAGS:
                raise ConfigError(
                    f"extra argument {flag} is set by sglang-args itself; use its own option "
                    "or change the topology/placement"
                )
        self._check_disaggregation()
        recorder_deepep_mode(self.extra_args)  # a recorder mode DeepEP cannot run: refuse
        if self.model_name is not None:
            check_expert_location(self.model_name)  # a model SGLang cannot place: refuse

    def _check_disaggregation(self) -> None:
        mode = self.disaggregation_mode
        if mode is not None and mode not in DISAGGREGATION_MODES:
            raise ConfigError(
                f"--disaggregation-mode {mode!r} must be prefill or decode (leave it out "
                "for a mixed instance)"
            )
        port = self.disaggregation_bootstrap_port
        if port is not None and mode != "prefill":
            raise ConfigError(
                "--disaggregation-bootstrap-port is a prefill instance's bootstrap server "
                "port: give it only with --disaggregation-mode prefill (decode learns it "
                "from each request's bootstrap_port)"
            )
        if self.disaggregation_transfer_backend is not None:
            if mode is None:
                raise ConfigError(
                    "--disaggregation-transfer-backend needs --disaggregation-mode prefill "
                    "or decode (give both roles the same backend)"
                )
            if _BACKEND_NAME.fullmatch(self.disaggregation_transfer_backend) is None:
                raise ConfigError(
                    f"--disaggregation-transfer-backend "
                    f"{self.disaggregation_transfer_backend!r} must be a backend name such "
                    "as mooncake or nixl"
                )
        if mode is None:
            return
        if mode == "prefill" and self.disaggregation_transfer_backend == "fake":
            raise ConfigError(
                "--disaggregation-transfer-backend fake sends no KV (it is for testing a "
                "decode instance alone): SGLang 0.5.20 and later refuse it on prefill"
            )
        if self.version < DISAGGREGATION_SINCE:
            raise ConfigError(
                f"--disaggregation-mode {mode}: SGLang {self.version} is older than every "
                f"version checked for prefill/decode disaggregation (its flags are in the "
                f"argparse of {DISAGGREGATION_SINCE} and every later checked version); "
                "use a newer SGLang"
            )
        if mode == "prefill":
            bootstrap = self.bootstrap_port
            assert bootstrap is not None
            if not 0 < bootstrap < 65536:
                raise ConfigError(f"--disaggregation-bootstrap-port {bootstrap} must be in 1-65535")
            taken = {self.port: "--port"}
            if self.dist_init_addr is not None:
                match = _HOST_PORT.fullmatch(self.dist_init_addr)
                if match is not None:
                    taken[int(match["port"])] = "--dist-init-addr"
            if bootstrap in taken:
                raise ConfigError(
                    f"--disaggregation-bootstrap-port {bootstrap} is also node 0's "
                    f"{taken[bootstrap]} port: the bootstrap server needs a port of its own"
                )

    @property
    def role(self) -> str:
        """The instance's role as ``[[backend.instances]] role`` spells it: ``mixed``,
        ``prefill`` or ``decode``."""
        return self.disaggregation_mode or "mixed"

    @property
    def bootstrap_port(self) -> int | None:
        """A prefill instance's bootstrap port (the given one, else SGLang's default);
        None for another role."""
        if self.disaggregation_mode != "prefill":
            return None
        if self.disaggregation_bootstrap_port is None:
            return DEFAULT_BOOTSTRAP_PORT
        return self.disaggregation_bootstrap_port

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def tp_size(self) -> int:
        """TP size = EP size = attention DP size = every GPU (attention TP 1)."""
        return self.num_gpus

    @property
    def redundant_experts(self) -> int:
        """``--ep-num-redundant-experts``: physical slots beyond one per logical expert."""
        return self.num_slots - self.num_experts

    @property
    def uses_attn_dp_size(self) -> bool:
        return self.version >= ATTN_DP_SIZE_SINCE

    @property
    def returns_routed_experts(self) -> bool:
        return self.version >= ROUTED_EXPERTS_SINCE

    @property
    def uses_routing_key_policy(self) -> bool:
        return self.version >= ROUTING_KEY_POLICY_SINCE

    @property
    def recorder_mode(self) -> str | None:
        """``--expert-distribution-recorder-mode`` from ``extra_args``, or None."""
        return extra_arg_value(self.extra_args, "--expert-distribution-recorder-mode")

    @property
    def added_deepep_mode(self) -> str | None:
        """The ``--deepep-mode`` this launch adds for its recorder mode (None: none)."""
        return recorder_deepep_mode(self.extra_args)

    @property
    def model_warning(self) -> str | None:
        """Why ``model_name`` was not checked for expert-location support, or None."""
        return None if self.model_name is None else check_expert_location(self.model_name)

    def dp_ranks(self, node_rank: int) -> range:
        """DP ranks that node ``node_rank`` runs: ``[n * G, (n + 1) * G)``."""
        return range(node_rank * self.gpus_per_node, (node_rank + 1) * self.gpus_per_node)


def node_argv(launch: SglangLaunch, node_rank: int) -> list[str]:
    """The full command of node ``node_rank``, ``python3 -m sglang.launch_server ...``."""
    if not 0 <= node_rank < launch.nodes:
        raise ConfigError(f"node rank {node_rank} outside [0, {launch.nodes})")
    n = str(launch.tp_size)
    argv = [*LAUNCH_PREFIX, "--model-path", launch.model_path]
    argv += ["--nnodes", str(launch.nodes), "--node-rank", str(node_rank)]
    if launch.dist_init_addr is not None:
        argv += ["--dist-init-addr", launch.dist_init_addr]
    argv += ["--tp-size", n, "--ep-size", n]
    if launch.uses_attn_dp_size:
        argv += ["--attn-dp-size", n]
    else:
        argv += ["--enable-dp-attention", "--dp-size", n]
    argv += ["--moe-a2a-backend", "deepep"]
    if launch.added_deepep_mode is not None:
        argv += ["--deepep-mode", launch.added_deepep_mode]
    argv += ["--init-expert-location", launch.expert_location]
    argv += ["--ep-num-redundant-experts", str(launch.redundant_experts)]
    argv += ["--ep-dispatch-algorithm", "static"]
    if launch.returns_routed_experts:
        argv.append("--enable-return-routed-experts")
    if launch.uses_routing_key_policy:
        argv += ["--schedule-policy", "routing-key"]
    if launch.disaggregation_mode is not None:
        argv += ["--disaggregation-mode", launch.disaggregation_mode]
        if launch.bootstrap_port is not None:  # every prefill node: see the module doc
            argv += ["--disaggregation-bootstrap-port", str(launch.bootstrap_port)]
        if launch.disaggregation_transfer_backend is not None:
            argv += ["--disaggregation-transfer-backend", launch.disaggregation_transfer_backend]
    if node_rank == 0:
        argv += ["--host", launch.host, "--port", str(launch.port)]
        if launch.api_key_env is not None:
            argv += ["--api-key", env_reference(launch.api_key_env)]
    argv += list(launch.extra_args)
    return argv


def all_node_argv(launch: SglangLaunch) -> list[list[str]]:
    """[nodes] commands, node rank order."""
    return [node_argv(launch, r) for r in range(launch.nodes)]


def launch_notes(launch: SglangLaunch) -> list[str]:
    """Plain-words remarks that go with the commands (comments in the shell script)."""
    if launch.disaggregation_mode is None:
        point = "point the scheduler's [backend] url at it."
    else:
        point = f'point the url of a [[backend.instances]] entry with role = "{launch.role}" at it.'
    notes = [
        "--enable-eplb is left off on purpose: SGLang's online EPLB would periodically "
        "overwrite this placement with its own (docs/sources.md, SGLang's online EPLB).",
        f"Node n runs DP ranks [n*{launch.gpus_per_node}, (n+1)*{launch.gpus_per_node}); "
        f"only node 0 serves HTTP, on {launch.host}:{launch.port}: {point}",
    ]
    notes += _disaggregation_notes(launch)
    if launch.api_key_env is not None:
        notes.append(
            f"Node 0 takes --api-key from ${launch.api_key_env} (the key is never written "
            f"here): set {launch.api_key_env} on node 0 to the key the scheduler sends "
            "(MOE_SCHEDULER_BACKEND_API_KEY); /health, /ready and /metrics stay open."
        )
    else:
        notes.append(
            "No --api-key: SGLang's HTTP API (including /generate and its admin endpoints) "
            "is open to whoever reaches node 0's port."
        )
    if launch.model_warning is not None:
        notes.append(f"Warning: {launch.model_warning}.")
    if not launch.uses_attn_dp_size:
        notes.append(
            f"SGLang {launch.version} predates --attn-dp-size (0.5.22): attention DP uses "
            "--enable-dp-attention --dp-size."
        )
    if not launch.uses_routing_key_policy:
        notes.append(
            f"--schedule-policy routing-key is omitted: SGLang {launch.version} rejects it "
            "(a valid choice from 0.5.8). Each rank keeps SGLang's default queue order "
            "(fcfs) instead of favouring waiting requests whose routing_key is frequent in "
            "its running batch: the scheduler still picks the rank, but requests of one "
            "class are no longer batched together within it."
        )
    if launch.added_deepep_mode is not None:
        notes.append(
            f"--deepep-mode {launch.added_deepep_mode} is added for "
            f"--expert-distribution-recorder-mode {launch.recorder_mode}: with DeepEP's "
            "default auto mode SGLang's recorder raises NotImplementedError for it (only "
            "per_token works there). normal turns CUDA graphs off for decode; to record "
            "on a production launch prefer per_token."
        )
    if not launch.returns_routed_experts:
        notes.append(
            f"--enable-return-routed-experts is omitted: SGLang {launch.version} has no such "
            "flag (it arrived in 0.5.7); set [backend] return_routed_experts = false in "
            "scheduler.toml."
        )
    return notes


def _disaggregation_notes(launch: SglangLaunch) -> list[str]:
    mode = launch.disaggregation_mode
    if mode is None:
        return []
    notes = []
    if mode == "prefill":
        notes.append(
            f"Prefill instance: node 0 runs SGLang's bootstrap server on port "
            f"{launch.bootstrap_port}, which decode instances must reach (the scheduler "
            "sends it to them as bootstrap_port). --load-balance-method stays SGLang's "
            "default (auto resolves to follow_bootstrap_room on prefill; round_robin, the "
            "default before 0.5.8, routes by bootstrap_room there too), which in every "
            "checked version first honours the DP rank the scheduler pins."
        )
    else:
        notes.append(
            "Decode instance: it takes each request's KV from the prefill instance that "
            "the request's bootstrap_host, bootstrap_port and bootstrap_room name (the "
            "scheduler sets them)."
        )
    backend = launch.disaggregation_transfer_backend
    shown = "SGLang's default, mooncake" if backend is None else backend
    notes.append(
        f"KV transfer backend: {shown}; give the prefill and the decode instances the same."
    )
    if launch.version < DISAGG_PREFILL_DP_RANK_SINCE:
        notes.append(
            f"Warning: SGLang {launch.version} is older than {DISAGG_PREFILL_DP_RANK_SINCE}, "
            "the first checked version whose decode reads disagg_prefill_dp_rank; up to "
            "0.5.9 decode takes a request's own DP rank as its prefill's, so a decode leg "
            "pinned to another rank than its prefill leg never gets its KV."
        )
    return notes


def _rank_span(ranks: range) -> str:
    return f"{ranks.start}" if len(ranks) == 1 else f"{ranks.start}-{ranks.stop - 1}"


def _render_group(launch: SglangLaunch, group: list[str]) -> str:
    """One flag and its values, shell-quoted; the API key as a double-quoted variable
    that must be set and non-empty (SGLang treats an empty --api-key as no key)."""
    if launch.api_key_env is not None and group == [
        "--api-key",
        env_reference(launch.api_key_env),
    ]:
        name = launch.api_key_env  # unset or empty: the shell stops (SGLang would run open)
        return f'--api-key "${{{name}:?set {name} to the SGLang API key}}"'
    return " ".join(shlex.quote(a) for a in group)


def render_shell(launch: SglangLaunch, header: list[str] | None = None) -> str:
    """A shell listing: comments, then per node a ``# node N`` line and its command,
    one flag per continuation line, every value shell-quoted. Run node N's command on
    node N (the commands run in the foreground; this is not one script to execute)."""
    lines = [f"# {h}" for h in header or []]
    lines += [f"# {note}" for note in launch_notes(launch)]
    for rank, argv in enumerate(all_node_argv(launch)):
        http = f"; HTTP on {launch.host}:{launch.port}" if rank == 0 else ""
        if rank == 0 and launch.bootstrap_port is not None:
            http += f"; bootstrap server on port {launch.bootstrap_port}"
        lines.append("")
        lines.append(f"# node {rank}: DP ranks {_rank_span(launch.dp_ranks(rank))}{http}")
        prefix, rest = argv[: len(LAUNCH_PREFIX)], argv[len(LAUNCH_PREFIX) :]
        groups: list[list[str]] = [prefix]
        for arg in rest:
            if arg.startswith("--"):
                groups.append([arg])
            else:
                groups[-1].append(arg)
        rendered = [_render_group(launch, g) for g in groups]
        lines.append(" \\\n    ".join(rendered))
    return "\n".join(lines) + "\n"


def render_json(launch: SglangLaunch) -> dict[str, Any]:
    """The same as a JSON-able object: the role (``mixed``, ``prefill`` or ``decode``, as
    ``[[backend.instances]] role``), a prefill's bootstrap port and the transfer backend
    given (None: SGLang's default), notes, and per node its rank, DP ranks, HTTP address
    (node 0 only) and argv (the API key as ``$(NAME)``, for Kubernetes args)."""
    return {
        "format": "moe-scheduler-sglang-args",
        "version": 1,
        "sglang_version": str(launch.version),
        "role": launch.role,
        "disaggregation_bootstrap_port": launch.bootstrap_port,
        "disaggregation_transfer_backend": launch.disaggregation_transfer_backend,
        "tp_size": launch.tp_size,
        "ep_size": launch.tp_size,
        "attn_dp_size": launch.tp_size,
        "ep_num_redundant_experts": launch.redundant_experts,
        "api_key_env": launch.api_key_env,
        "notes": launch_notes(launch),
        "nodes": [
            {
                "node_rank": rank,
                "dp_ranks": [launch.dp_ranks(rank).start, launch.dp_ranks(rank).stop - 1],
                "http": f"{launch.host}:{launch.port}" if rank == 0 else None,
                "argv": argv,
            }
            for rank, argv in enumerate(all_node_argv(launch))
        ],
    }
