"""Validate a ``/generate`` body as the emulated SGLang version reads it (pure).

SGLang's ``GenerateReqInput`` is a dataclass: a key it does not know is dropped without a
word. So what a request field does depends on the version: ``routed_dp_rank`` exists from
0.5.20 (``data_parallel_rank`` stays as its deprecated alias, and when both are given
``routed_dp_rank`` wins); older versions know only ``data_parallel_rank`` and drop
``routed_dp_rank``, so such a request is load-balanced as if unpinned
(``scheduler.sglang_versions.rank_field``). ``return_routed_experts`` is dropped before
0.5.7 and ``routed_experts_start_len`` before 0.5.9 (docs/sglang-versions.md), and
``disagg_prefill_dp_rank`` before 0.5.20: such a decode takes its own
``data_parallel_rank`` as the prefill rank that holds its KV
(``disaggregation/decode.py`` of 0.5.9; see :func:`expected_prefill_rank`).

The PD fields ``bootstrap_host``, ``bootstrap_port``, ``bootstrap_room`` and
``disagg_prefill_dp_rank`` are read whatever the role; a mixed instance then ignores them,
as SGLang does when it is not in PD mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scheduler.errors import MoeSchedulerError
from scheduler.sglang_versions import ROUTED_EXPERTS_SINCE, SglangVersion, rank_field

#: Largest max_new_tokens accepted (the emulator keeps no KV cache to bound it otherwise).
MAX_NEW_TOKENS_LIMIT = 1 << 16
#: ``routed_experts_start_len`` arrives with the OpenAI routed-experts fields (PR #17434).
ROUTED_EXPERTS_START_LEN_SINCE = SglangVersion.parse("0.5.9")
#: ``disagg_prefill_dp_rank`` on /generate (0.5.20 has it; 0.5.9 and older drop it; in
#: between nothing was checked): the same fact as scheduler.sglang_versions records.
DISAGG_PREFILL_DP_RANK_SINCE = SglangVersion.parse("0.5.20")
#: SGLang's ``bootstrap_room`` is an int64 (the router draws ``u64 & i64::MAX``).
MAX_ROOM = 2**63 - 1


class BadRequest(MoeSchedulerError):
    """A /generate body the emulator refuses (HTTP 400)."""


@dataclass(frozen=True)
class GenerateRequest:
    """The fields of SGLang's ``GenerateReqInput`` the emulator honours.

    ``routed_dp_rank`` is the rank the request is pinned to, from whichever field the
    version reads (``pinned_field`` names it; None when unpinned).
    """

    text: str | None
    input_ids: tuple[int, ...] | None
    max_new_tokens: int
    stream: bool
    return_routed_experts: bool
    routed_experts_start_len: int
    routed_dp_rank: int | None
    rid: str | None
    pinned_field: str | None = None
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None
    disagg_prefill_dp_rank: int | None = None


def _int_field(body: dict[str, Any], key: str, *, minimum: int = 0) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise BadRequest(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _pinned_rank(body: dict[str, Any], version: SglangVersion) -> tuple[int | None, str | None]:
    """(rank, the field that gave it) as ``version`` reads the body."""
    if rank_field(version) == "data_parallel_rank":  # routed_dp_rank is an unknown key
        rank = _int_field(body, "data_parallel_rank")
        return rank, None if rank is None else "data_parallel_rank"
    rank = _int_field(body, "routed_dp_rank")
    alias = _int_field(body, "data_parallel_rank")  # deprecated spelling, still accepted
    if rank is not None:  # SGLang copies the alias only when routed_dp_rank is unset
        return rank, "routed_dp_rank"
    return alias, None if alias is None else "data_parallel_rank"


def _bootstrap_fields(body: dict[str, Any]) -> tuple[str | None, int | None, int | None]:
    host = body.get("bootstrap_host")
    if host is not None and (not isinstance(host, str) or not host):
        raise BadRequest(f"bootstrap_host must be a non-empty string, got {host!r}")
    port = _int_field(body, "bootstrap_port", minimum=1)
    if port is not None and port > 65535:
        raise BadRequest(f"bootstrap_port must be a port number, got {port}")
    room = _int_field(body, "bootstrap_room")
    if room is not None and room > MAX_ROOM:
        raise BadRequest(f"bootstrap_room must fit an int64, got {room}")
    return host, port, room


def parse_generate(
    body: Any, default_max_new_tokens: int, version: SglangVersion
) -> GenerateRequest:
    """Validate a /generate body as SGLang ``version`` reads it; raises BadRequest naming
    the field."""
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
    rank, pinned_field = _pinned_rank(body, version)
    rid = body.get("rid")
    if rid is not None and not isinstance(rid, str):
        raise BadRequest("rid must be a string")
    for flag in ("stream", "return_routed_experts"):
        if not isinstance(body.get(flag, False), bool):
            raise BadRequest(f"{flag} must be true or false")
    host, port, room = _bootstrap_fields(body)
    routed = body.get("return_routed_experts", False) and version >= ROUTED_EXPERTS_SINCE
    start_len = (
        _int_field(body, "routed_experts_start_len") or 0
        if version >= ROUTED_EXPERTS_START_LEN_SINCE
        else 0
    )
    return GenerateRequest(
        text=text,
        input_ids=None if input_ids is None else tuple(input_ids),
        max_new_tokens=max_new,
        stream=body.get("stream", False),
        return_routed_experts=routed,
        routed_experts_start_len=start_len,
        routed_dp_rank=rank,
        rid=rid,
        pinned_field=pinned_field,
        bootstrap_host=host,
        bootstrap_port=port,
        bootstrap_room=room,
        disagg_prefill_dp_rank=(
            _int_field(body, "disagg_prefill_dp_rank")
            if version >= DISAGG_PREFILL_DP_RANK_SINCE
            else None
        ),
    )


def expected_prefill_rank(request: GenerateRequest, version: SglangVersion) -> int | None:
    """The prefill DP rank a decode request expects its KV on: ``disagg_prefill_dp_rank``;
    before 0.5.20 the decode's own pinned rank (``data_parallel_rank``); None: it asks the
    bootstrap server, which knows."""
    if version >= DISAGG_PREFILL_DP_RANK_SINCE:
        return request.disagg_prefill_dp_rank
    return request.routed_dp_rank


def estimate_prompt_tokens(text: str) -> int:
    """About 4 bytes of UTF-8 per token (BPE tokenizers on English text); at least 1."""
    return max(1, (len(text.encode("utf-8")) + 3) // 4)
