"""The emulator's core: request bodies in, SGLang-shaped responses out. No sockets.

:class:`Emulator` validates a ``/generate`` body (``generate_request``, as the emulated
SGLang version reads it), picks its DP rank, checks the PD fields of its role (mixed,
prefill or decode: SGLang's ``--disaggregation-mode``), classifies it, draws its routing
and times it with the project's cost model (``timing``); ``app`` wraps it in HTTP and the
clock. A request's routing, output tokens and text are a deterministic
function of the seed and the request (prompt, ``max_new_tokens``), whatever else is
running. Its latency uses the expected traffic of its class on its rank under SGLang's
static dispatch (``scheduler.accounting``); its ``routed_experts`` are drawn (with the
per-request variation) only when asked for.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from scheduler.accounting import CostModel, static_dispatch_table
from scheduler.emulator.auth import check_api_key
from scheduler.emulator.generate_request import (
    DISAGG_PREFILL_DP_RANK_SINCE,
    MAX_NEW_TOKENS_LIMIT,
    BadRequest,
    GenerateRequest,
    estimate_prompt_tokens,
    parse_generate,
)
from scheduler.emulator.kv_rooms import DEFAULT_BOOTSTRAP_PORT, DEFAULT_KV_TIMEOUT_S, KvRooms
from scheduler.emulator.ranks import LOAD_BALANCE_METHODS, RankPool, Ticket
from scheduler.emulator.request_log import RequestLog
from scheduler.emulator.routing import (
    DEFAULT_CONCENTRATION,
    draw_request_routing,
    expand_to_hidden_layers,
    inclusion_probabilities,
    sample_token_experts,
)
from scheduler.emulator.timing import (
    EmulatorTiming,
    ServingOverheads,
    TokenTraffic,
    expected_copies,
    held_experts,
)
from scheduler.emulator.workload import Workload, prompt_key
from scheduler.errors import MoeSchedulerError
from scheduler.model_shape import ModelShape
from scheduler.placement import Placement
from scheduler.sglang_versions import (
    NEWEST_CHECKED,
    SglangVersion,
)
from scheduler.traces.importers.sglang_generate import encode_routed_experts

__all__ = [
    "MAX_NEW_TOKENS_LIMIT",
    "SGLANG_API_VERSION",
    "BadRequest",
    "Emulator",
    "EmulatorConfig",
    "GenerateRequest",
    "Plan",
    "estimate_prompt_tokens",
    "parse_generate",
]

#: The SGLang release whose HTTP API the emulator follows (docs/sources.md), and
#: the default of ``--sglang-version``.
SGLANG_API_VERSION = str(NEWEST_CHECKED)
#: SGLang's ``--disaggregation-mode`` values; "mixed" is its "null" (no PD).
ROLES = ("mixed", "prefill", "decode")
#: Placeholder vocabulary of the generated text; the emulator runs no model.
_WORDS = (  # noqa: SIM905 (a word list reads better as one string)
    "the of and to in is was for on that with as by at from it an be this are which or "
    "have one had not but what all were when we there can more if no out so said up its "
    "about into than them time only new some could these two may then do first any like "
    "now my such make over"
).split()
_VOCAB = 32000


@dataclass(frozen=True)
class EmulatorConfig:
    """Options of one emulated cluster (one per ``emulate`` command).

    ``load_balance`` ``auto`` resolves as SGLang's does: ``follow_bootstrap_room`` on a
    prefill instance, ``round_robin`` otherwise. ``bootstrap_port`` is the prefill
    instance's bootstrap server (0: a free port); ``kv_timeout_s`` bounds, in wall
    seconds, how long a PD leg waits for its peer.
    """

    nodes: int
    gpus_per_node: int
    capacity: int = 32
    seed: int = 0
    concentration: float = DEFAULT_CONCENTRATION
    time_scale: float = 1.0
    default_max_new_tokens: int = 16
    load_balance: str = "auto"
    incremental_streaming_output: bool = False
    #: SGLang's ``--api-key`` (None or empty: no key); never shown in repr or /server_info.
    api_key: str | None = field(default=None, repr=False)
    sglang_version: str = SGLANG_API_VERSION
    role: str = "mixed"
    bootstrap_port: int = DEFAULT_BOOTSTRAP_PORT
    kv_timeout_s: float = DEFAULT_KV_TIMEOUT_S
    #: What /model_info reports as ``tokenizer_path`` (SGLang's default: the model path);
    #: a client such as SGLang's bench_serving loads its tokenizer from there.
    tokenizer_path: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "api_key", check_api_key(self.api_key))
        if self.load_balance == "auto":
            resolved = "follow_bootstrap_room" if self.role == "prefill" else "round_robin"
            object.__setattr__(self, "load_balance", resolved)
        try:
            SglangVersion.parse(self.sglang_version)
            version_ok = True
        except MoeSchedulerError:
            version_ok = False
        checks = [
            (
                version_ok,
                f"--sglang-version {self.sglang_version!r} is not a version (e.g. 0.5.23, "
                "0.5.5.post3)",
            ),
            (self.role in ROLES, f"--role must be one of {', '.join(ROLES)}, got {self.role!r}"),
            (
                0 <= self.bootstrap_port <= 65535,
                f"--disaggregation-bootstrap-port must be in [0, 65535], got {self.bootstrap_port}",
            ),
            (
                self.kv_timeout_s > 0 and math.isfinite(self.kv_timeout_s),
                f"--kv-timeout must be a finite number > 0, got {self.kv_timeout_s}",
            ),
            (
                self.load_balance != "follow_bootstrap_room" or self.role != "mixed",
                "--load-balance-method follow_bootstrap_room needs --role prefill or decode "
                "(a mixed request has no bootstrap_room)",
            ),
            (self.nodes >= 1, f"--nodes must be >= 1, got {self.nodes}"),
            (self.gpus_per_node >= 1, f"--gpus-per-node must be >= 1, got {self.gpus_per_node}"),
            (self.capacity >= 1, f"--capacity must be >= 1, got {self.capacity}"),
            (0 <= self.seed < 2**63, f"--seed must be in [0, 2**63), got {self.seed}"),
            (self.concentration > 0, f"--concentration must be > 0, got {self.concentration}"),
            (self.time_scale >= 0, f"--time-scale must be >= 0, got {self.time_scale}"),
            (
                0 <= self.default_max_new_tokens <= MAX_NEW_TOKENS_LIMIT,
                f"--max-new-tokens must be in [0, {MAX_NEW_TOKENS_LIMIT}]",
            ),
            (
                self.load_balance in LOAD_BALANCE_METHODS,
                f"--load-balance-method must be one of {', '.join(LOAD_BALANCE_METHODS)}",
            ),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def num_ranks(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def version(self) -> SglangVersion:
        return SglangVersion.parse(self.sglang_version)


@dataclass(frozen=True)
class Plan:
    """Everything decided about a request before it is admitted to its rank.

    ``completion_tokens`` is what this instance generates: ``max_new_tokens``, except on
    a prefill instance (one token, SGLang's prefill answer). ``output_ids`` and the routing
    draw always follow the whole request, so a prefill's token and prompt routing are the
    first of its decode peer's."""

    request: GenerateRequest
    request_id: str
    rank: int
    class_name: str
    class_from: str
    prompt_tokens: int
    completion_tokens: int
    locality: ClassLocality
    ticket: Ticket
    output_ids: tuple[int, ...]
    seed_words: tuple[int, ...]  # seeds the draw of the request's routing


@dataclass(frozen=True)
class ClassLocality:
    """Expected per-token traffic (per MoE layer, averaged over the layers) of a class's
    prompt and decode tokens on one rank, from the class's own shares. Timing uses
    these; the per-request routing draw only feeds ``routed_experts``."""

    prefill: TokenTraffic
    decode: TokenTraffic


class Emulator:
    """One emulated SGLang cluster: N x G DP-attention ranks, one model, one placement."""

    def __init__(
        self,
        config: EmulatorConfig,
        model: ModelShape,
        placement: Placement,
        workload: Workload,
        cost: CostModel | None = None,
        *,
        overheads: ServingOverheads | None = None,
        profile_source: str = "",
        placement_spec: str = "trivial",
    ) -> None:
        if placement.num_gpus != config.num_ranks:
            raise ValueError(
                f"placement is for {placement.num_gpus} GPUs, cluster has {config.num_ranks}"
            )
        self.config = config
        self.model = model
        self.placement = placement
        self.placement_spec = placement_spec
        self.workload = workload
        self.cost = cost or CostModel()
        self.overheads = overheads or ServingOverheads()
        self.profile_source = profile_source
        self.dest_gpu = static_dispatch_table(placement)  # [ranks, layers, experts]
        self.timing_model = EmulatorTiming(
            self.cost, model, self.overheads, held_experts(placement)
        )
        self.version = config.version
        #: What this process was sent, over every run of its instance (not reset).
        self.requests = RequestLog(config.role, config.num_ranks)
        #: The prefill's bound bootstrap port (the configured one until it is bound).
        self.bootstrap_port = config.bootstrap_port
        self.reset()
        self._ids = random.Random(config.seed)
        self._localities: dict[tuple[str, int], ClassLocality] = {}
        self._inclusion: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def reset(self) -> None:
        """A fresh instance: new ranks (all ``ok``, nothing in flight), no bootstrap rooms,
        the configured time scale. The caches and the request log stay."""
        c = self.config
        self.pool = RankPool(c.num_ranks, c.capacity, load_balance=c.load_balance)
        self.rooms = KvRooms()
        self.closing = False
        self.time_scale = c.time_scale  # wall seconds per modelled second; settable

    @property
    def role(self) -> str:
        return self.config.role

    # ----------------------------------------------------------------- planning

    def plan(
        self, body: Any, *, class_text: str | None = None, pinned_field: str | None = None
    ) -> Plan:
        """Validate a /generate body and decide rank, class, routing and tokens.

        ``class_text``: the text the prompt's class is looked up by, when not the prompt
        itself (a chat request: its last user message, not the rendered template);
        ``pinned_field``: what pinned the rank when not a body field (the OpenAI
        endpoints' ``X-Data-Parallel-Rank`` header), for the request log.
        Raises BadRequest, or ControllerCrash where SGLang's DP controller would raise.
        """
        request = parse_generate(body, self.config.default_max_new_tokens, self.version)
        if pinned_field is not None and request.routed_dp_rank is not None:
            request = replace(request, pinned_field=pinned_field)
        if request.text is not None:
            key = prompt_key(request.text)
            prompt_tokens = estimate_prompt_tokens(request.text)
        else:
            assert request.input_ids is not None
            key = hashlib.blake2b(
                np.asarray(request.input_ids, dtype=np.int64).tobytes(), digest_size=16
            ).digest()
            prompt_tokens = len(request.input_ids)
        if prompt_tokens < 1:
            raise BadRequest("the prompt is empty")
        if request.routed_experts_start_len > prompt_tokens:
            raise BadRequest(
                f"routed_experts_start_len {request.routed_experts_start_len} is outside "
                f"[0, {prompt_tokens}] (prompt_tokens)"
            )
        pd = self.role != "mixed"  # a mixed instance ignores the bootstrap fields
        try:
            rank = self.pool.pick(request.routed_dp_rank, request.bootstrap_room if pd else None)
        except ValueError as e:
            raise BadRequest(str(e)) from e
        request_id = request.rid or f"{self._ids.getrandbits(128):032x}"
        if pd:
            self._check_bootstrap_fields(request, request_id)
        class_key = key if class_text is None else prompt_key(class_text)
        class_name, class_from = self.workload.class_of(class_key)
        requested = request.max_new_tokens
        completion = min(requested, 1) if self.role == "prefill" else requested
        locality = self._class_locality(class_name, rank)
        seed = self.config.seed.to_bytes(8, "little", signed=True)
        stream = hashlib.shake_128(seed + key + requested.to_bytes(4, "little"))
        output_ids = tuple(
            v % _VOCAB for v in np.frombuffer(stream.digest(2 * requested), "<u2").tolist()
        )[:completion]
        return Plan(
            request=request,
            request_id=request_id,
            rank=rank,
            class_name=class_name,
            class_from=class_from,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
            locality=locality,
            ticket=Ticket(
                prompt_tokens=prompt_tokens,
                total_tokens=prompt_tokens + completion,
                traffic=locality.decode,
            ),
            output_ids=output_ids,
            seed_words=(*np.frombuffer(key, "<u4").tolist(), requested),
        )

    def follow_room_conflict(self, plan: Plan) -> str | None:
        """SGLang's prefill KV sender under ``follow_bootstrap_room``: a request pinned to
        a rank other than ``bootstrap_room % ranks`` fails unless it names its rank in
        ``disagg_prefill_dp_rank`` (``disaggregation/common/conn.py``, CommonKVSender;
        read in 0.5.23, so not applied before 0.5.20, which has no such field)."""
        r, n = plan.request, self.config.num_ranks
        if (
            self.role != "prefill"
            or self.version < DISAGG_PREFILL_DP_RANK_SINCE
            or self.config.load_balance != "follow_bootstrap_room"
            or n == 1
            or r.bootstrap_room is None
            or r.disagg_prefill_dp_rank is not None
            or plan.rank == r.bootstrap_room % n
        ):
            return None
        implied = r.bootstrap_room % n
        return (
            f"follow_bootstrap_room conflict: dispatched to dp_rank {plan.rank} but "
            f"bootstrap_room {r.bootstrap_room} implies dp_rank {implied}. Set "
            "SGLANG_DISAGGREGATION_FORCE_QUERY_PREFILL_DP_RANK=1 to allow mixed routing."
        )

    def _check_bootstrap_fields(self, request: GenerateRequest, request_id: str) -> None:
        """A PD request needs its room (SGLang's scheduler refuses it without one, 400);
        a decode request also needs the prefill's bootstrap address to fetch the KV from."""
        if request.bootstrap_room is None:
            raise BadRequest(
                "Invalid request: Disaggregated request received without bootstrap room id. "
                f"req.rid={request_id!r}"
            )
        if self.role == "decode" and (
            request.bootstrap_host is None or request.bootstrap_port is None
        ):
            raise BadRequest(
                "Invalid request: a decode request needs bootstrap_host and bootstrap_port "
                f"(the prefill instance's bootstrap server) to fetch its KV. req.rid={request_id!r}"
            )

    def _class_inclusion(self, class_name: str) -> tuple[np.ndarray, np.ndarray]:
        """(prefill, decode) inclusion probabilities [moe_layers, experts] of a class."""
        cached = self._inclusion.get(class_name)
        if cached is None:
            routing, k = self.workload.routing[class_name], self.model.top_k
            prefill = inclusion_probabilities(routing.prefill, k)
            same = routing.decode is routing.prefill
            decode = prefill if same else inclusion_probabilities(routing.decode, k)
            cached = self._inclusion[class_name] = (prefill, decode)
        return cached

    def _class_locality(self, class_name: str, rank: int) -> ClassLocality:
        cached = self._localities.get((class_name, rank))
        if cached is None:
            prefill_pi, decode_pi = self._class_inclusion(class_name)
            dest, p = self.dest_gpu[rank], self.placement
            nodes, per_node = p.num_nodes, p.gpus_per_node
            prefill = expected_copies(prefill_pi, dest, rank, nodes, per_node).mean()
            decode = (
                prefill
                if decode_pi is prefill_pi
                else expected_copies(decode_pi, dest, rank, nodes, per_node).mean()
            )
            cached = self._localities[(class_name, rank)] = ClassLocality(prefill, decode)
        return cached

    def timing(self, plan: Plan) -> tuple[float, float]:
        """(prefill seconds, seconds per decode token) of an admitted request, from its
        rank's running set now (itself included). Modelled time, before --time-scale."""
        model = self.timing_model
        step = model.decode_step_s(self.pool.batch_traffic(plan.rank), plan.rank)
        prefill = model.prefill_s(plan.prompt_tokens, plan.locality.prefill, plan.rank)
        return prefill, step

    # ----------------------------------------------------------------- responses

    @staticmethod
    def text_of(output_ids: tuple[int, ...]) -> str:
        return "".join(" " + _WORDS[i % len(_WORDS)] for i in output_ids)

    def routed_experts(self, plan: Plan) -> str:
        """The base64 ``meta_info.routed_experts`` of a finished request: int32
        [prompt + completion - 1 - start_len, hidden_layers, top_k], dense rows zero."""
        k = self.model.top_k
        rng = np.random.default_rng([self.config.seed, *plan.seed_words])
        routing = draw_request_routing(
            self.workload.routing[plan.class_name], k, self.config.concentration, rng
        )
        decode_rows = max(plan.request.max_new_tokens - 1, 0)  # the whole request's draw
        if routing.decode is routing.prefill:  # one draw for every position
            ids = sample_token_experts(routing.prefill, plan.prompt_tokens + decode_rows, k, rng)
        else:
            prompt_ids = sample_token_experts(routing.prefill, plan.prompt_tokens, k, rng)
            decode_ids = sample_token_experts(routing.decode, decode_rows, k, rng)
            ids = np.concatenate([prompt_ids, decode_ids])  # one row per position
        end = plan.prompt_tokens + plan.completion_tokens - 1  # the last token has no row
        rows = ids[plan.request.routed_experts_start_len : max(end, 0)]
        return encode_routed_experts(expand_to_hidden_layers(rows, self.model))

    def meta_info(
        self,
        plan: Plan,
        completion_tokens: int,
        *,
        finished: bool,
        e2e_latency: float | None = None,
        modelled: tuple[float, float] | None = None,
    ) -> dict[str, Any]:
        # SGLang's prefill server finishes its one token with FINISH_LENGTH(length=0)
        length = 0 if self.role == "prefill" else completion_tokens
        meta: dict[str, Any] = {
            "id": plan.request_id,
            "finish_reason": {"type": "length", "length": length} if finished else None,
            "prompt_tokens": plan.prompt_tokens,
            "completion_tokens": completion_tokens,
            "cached_tokens": 0,
            "dp_rank": plan.rank,
        }
        if finished:
            meta["e2e_latency"] = e2e_latency
            if plan.request.return_routed_experts:
                meta["routed_experts"] = self.routed_experts(plan)
            prefill, per_token = modelled or (None, None)
            meta["emulator"] = {
                "routing": "drawn from a real per-class profile, not measured",
                "class": plan.class_name,
                "class_from": plan.class_from,
                "modelled_prefill_s": prefill,
                "modelled_s_per_token": per_token,
                "expected_node_copies_per_token_layer": round(plan.locality.decode.node_copies, 4),
                "expected_intra_node_copies_per_token_layer": round(
                    plan.locality.decode.intra_node_copies, 4
                ),
            }
        return meta

    def response(
        self, plan: Plan, e2e_latency: float, modelled: tuple[float, float]
    ) -> dict[str, Any]:
        """The non-streaming /generate response of a finished request."""
        return {
            "text": self.text_of(plan.output_ids),
            "output_ids": list(plan.output_ids),
            "meta_info": self.meta_info(
                plan,
                plan.completion_tokens,
                finished=True,
                e2e_latency=e2e_latency,
                modelled=modelled,
            ),
        }

    def abort_chunk(self, plan: Plan, message: str, status: int) -> dict[str, Any]:
        """The chunk SGLang streams for a request it aborts (``FINISH_ABORT``)."""
        return {
            "text": "",
            "output_ids": [],
            "meta_info": {
                "id": plan.request_id,
                "finish_reason": {
                    "type": "abort",
                    "message": message,
                    "status_code": status,
                    "err_type": None,
                },
                "prompt_tokens": plan.prompt_tokens,
                "completion_tokens": 0,
                "cached_tokens": 0,
                "dp_rank": plan.rank,
            },
        }

    def stream_chunk(
        self,
        plan: Plan,
        done: int,
        previous: int,
        *,
        e2e_latency: float | None = None,
        modelled: tuple[float, float] | None = None,
    ) -> dict[str, Any]:
        """The streamed chunk after ``done`` tokens (``previous`` sent before).

        Cumulative text and ids, as SGLang streams by default; only the new part with
        ``incremental_streaming_output``.
        """
        start = previous if self.config.incremental_streaming_output else 0
        ids = plan.output_ids[start:done]
        finished = done == plan.completion_tokens
        return {
            "text": self.text_of(ids),
            "output_ids": list(ids),
            "meta_info": self.meta_info(
                plan, done, finished=finished, e2e_latency=e2e_latency, modelled=modelled
            ),
        }
