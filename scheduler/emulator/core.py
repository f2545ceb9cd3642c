"""The emulator's core: request bodies in, SGLang-shaped responses out. No sockets.

:class:`Emulator` validates a ``/generate`` body, picks its DP rank, classifies it, draws
its routing and times it with the project's cost model (``timing``); ``app`` wraps it in
HTTP and the clock. A request's routing, output tokens and text are a deterministic
function of the seed and the request (prompt, ``max_new_tokens``), whatever else is
running. Its latency uses the expected traffic of its class on its rank under SGLang's
static dispatch (``scheduler.accounting``); its ``routed_experts`` are drawn (with the
per-request variation) only when asked for.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from scheduler import __version__
from scheduler.accounting import CostModel, static_dispatch_table
from scheduler.emulator.auth import check_api_key
from scheduler.emulator.ranks import LOAD_BALANCE_METHODS, RankPool, Ticket
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
from scheduler.traces.importers.sglang_generate import encode_routed_experts

#: The SGLang release whose HTTP API the emulator follows (sglang-integration.md).
SGLANG_API_VERSION = "0.5.23"
#: Largest max_new_tokens accepted (the emulator keeps no KV cache to bound it otherwise).
MAX_NEW_TOKENS_LIMIT = 1 << 16
#: Placeholder vocabulary of the generated text; the emulator runs no model.
_WORDS = (  # noqa: SIM905 (a word list reads better as one string)
    "the of and to in is was for on that with as by at from it an be this are which or "
    "have one had not but what all were when we there can more if no out so said up its "
    "about into than them time only new some could these two may then do first any like "
    "now my such make over"
).split()
_VOCAB = 32000


class BadRequest(MoeSchedulerError):
    """A /generate body the emulator refuses (HTTP 400)."""


@dataclass(frozen=True)
class EmulatorConfig:
    """Options of one emulated cluster (one per ``emulate`` command)."""

    nodes: int
    gpus_per_node: int
    capacity: int = 32
    seed: int = 0
    concentration: float = DEFAULT_CONCENTRATION
    time_scale: float = 1.0
    default_max_new_tokens: int = 16
    load_balance: str = "round_robin"
    incremental_streaming_output: bool = False
    #: SGLang's ``--api-key`` (None or empty: no key); never shown in repr or /server_info.
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "api_key", check_api_key(self.api_key))
        checks = [
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


@dataclass(frozen=True)
class GenerateRequest:
    """The fields of SGLang's ``GenerateReqInput`` the emulator honours."""

    text: str | None
    input_ids: tuple[int, ...] | None
    max_new_tokens: int
    stream: bool
    return_routed_experts: bool
    routed_experts_start_len: int
    routed_dp_rank: int | None
    rid: str | None


@dataclass(frozen=True)
class Plan:
    """Everything decided about a request before it is admitted to its rank."""

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


def _int_field(body: dict[str, Any], key: str, *, minimum: int = 0) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise BadRequest(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def parse_generate(body: Any, default_max_new_tokens: int) -> GenerateRequest:
    """Validate a /generate body; raises BadRequest naming the field."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    text, input_ids = body.get("text"), body.get("input_ids")
    if isinstance(text, list) or (
        isinstance(input_ids, list) and input_ids and isinstance(input_ids[0], list)
    ):
        raise BadRequest("batch requests (a list of prompts) are not supported by the emulator")
    if (text is None) == (input_ids is None):
        raise BadRequest("give exactly one of text and input_ids")
    if text is not None and not isinstance(text, str):
        raise BadRequest("text must be a string")
    if input_ids is not None and (
        not isinstance(input_ids, list)
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in input_ids)
    ):
        raise BadRequest("input_ids must be a list of integers")
    params = body.get("sampling_params") or {}
    if not isinstance(params, dict):
        raise BadRequest("sampling_params must be an object")
    max_new = _int_field(params, "max_new_tokens")
    max_new = default_max_new_tokens if max_new is None else max_new
    if max_new > MAX_NEW_TOKENS_LIMIT:
        raise BadRequest(f"max_new_tokens must be <= {MAX_NEW_TOKENS_LIMIT}, got {max_new}")
    rank = _int_field(body, "routed_dp_rank")
    alias = _int_field(body, "data_parallel_rank")  # deprecated spelling, still accepted
    if rank is not None and alias is not None and rank != alias:
        raise BadRequest(f"routed_dp_rank {rank} and data_parallel_rank {alias} disagree")
    rid = body.get("rid")
    if rid is not None and not isinstance(rid, str):
        raise BadRequest("rid must be a string")
    for flag in ("stream", "return_routed_experts"):
        if not isinstance(body.get(flag, False), bool):
            raise BadRequest(f"{flag} must be true or false")
    return GenerateRequest(
        text=text,
        input_ids=None if input_ids is None else tuple(input_ids),
        max_new_tokens=max_new,
        stream=body.get("stream", False),
        return_routed_experts=body.get("return_routed_experts", False),
        routed_experts_start_len=_int_field(body, "routed_experts_start_len") or 0,
        routed_dp_rank=rank if rank is not None else alias,
        rid=rid,
    )


def estimate_prompt_tokens(text: str) -> int:
    """About 4 bytes of UTF-8 per token (BPE tokenizers on English text); at least 1."""
    return max(1, (len(text.encode("utf-8")) + 3) // 4)


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
        self.pool = RankPool(config.num_ranks, config.capacity, load_balance=config.load_balance)
        self.closing = False
        self.time_scale = config.time_scale  # wall seconds per modelled second; settable
        self._ids = random.Random(config.seed)
        self._localities: dict[tuple[str, int], ClassLocality] = {}
        self._inclusion: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    # ----------------------------------------------------------------- planning

    def plan(self, body: Any) -> Plan:
        """Validate a /generate body and decide rank, class, routing and tokens.

        Raises BadRequest, or RankUnavailable when no rank can take it.
        """
        request = parse_generate(body, self.config.default_max_new_tokens)
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
        try:
            rank = self.pool.pick(request.routed_dp_rank)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        class_name, class_from = self.workload.class_of(key)
        completion = request.max_new_tokens
        locality = self._class_locality(class_name, rank)
        seed = self.config.seed.to_bytes(8, "little", signed=True)
        stream = hashlib.shake_128(seed + key + completion.to_bytes(4, "little"))
        output_ids = tuple(
            v % _VOCAB for v in np.frombuffer(stream.digest(2 * completion), "<u2").tolist()
        )
        return Plan(
            request=request,
            request_id=request.rid or f"{self._ids.getrandbits(128):032x}",
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
            seed_words=(*np.frombuffer(key, "<u4").tolist(), completion),
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
        decode_rows = max(plan.completion_tokens - 1, 0)
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
        meta: dict[str, Any] = {
            "id": plan.request_id,
            "finish_reason": (
                {"type": "length", "length": completion_tokens} if finished else None
            ),
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

    # ----------------------------------------------------------------- server info

    def server_info(self) -> dict[str, Any]:
        """``/server_info``: the resolved server arguments SGLang 0.5.23 reports that the
        middleware reads, plus an ``emulator`` block."""
        c = self.config
        ranks = c.num_ranks
        return {
            "model_path": self.model.name,
            "served_model_name": self.model.name,
            "version": f"{SGLANG_API_VERSION}+moe-scheduler-emulator-{__version__}",
            "tp_size": ranks,
            "ep_size": ranks,
            "attn_dp_size": ranks,
            "dp_size": 1,
            "enable_dp_attention": ranks > 1,
            "nnodes": c.nodes,
            "ep_num_redundant_experts": self.placement.num_slots - self.model.num_experts,
            "init_expert_location": self.placement_spec,
            "ep_dispatch_algorithm": "static",
            "enable_return_routed_experts": True,
            "load_balance_method": c.load_balance,
            "incremental_streaming_output": c.incremental_streaming_output,
            "emulator": {
                "api_key_required": c.api_key is not None,
                "note": "moe-scheduler emulator: no model runs; routed experts are drawn "
                "from real per-class routing profiles, latency comes from the project's cost "
                "model (scheduler.accounting) over the expected traffic",
                "gpus_per_node": c.gpus_per_node,
                "capacity_per_rank": c.capacity,
                "seed": c.seed,
                "time_scale": self.time_scale,
                "concentration": c.concentration,
                "profile": self.profile_source,
                "classes": sorted(self.workload.routing),
                "domain_to_class": self.workload.domain_to_class,
                "default_class": self.workload.default,
                "prompt_index_size": len(self.workload.index),
                "model": self.model.to_dict(),
                "cost_model": asdict(self.cost),  # the GpuSpec becomes a nested object
                "serving_overheads": asdict(self.overheads),
            },
        }
