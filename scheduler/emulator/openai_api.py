"""SGLang's OpenAI endpoints, ``/v1/chat/completions`` and ``/v1/completions`` (pure).

SGLang serves them by translating: the OpenAI body becomes a ``GenerateReqInput`` (what
/generate takes), and what /generate produces (one dict per streamed chunk, or the
answer) becomes OpenAI's response. The emulator does the same, so an OpenAI request
takes /generate's whole path (rank, timing, routing, PD) and only this module differs:

- :func:`parse_chat` / :func:`parse_completion`: the OpenAI body in, a /generate body
  out (version rules below), or :class:`OpenAIRefusal` with SGLang's error body.
- :class:`OpenAIFormat`: /generate's answer and chunks in, SGLang's OpenAI JSON and SSE
  events out (``answer``, ``chunks`` per native chunk, ``end`` before ``[DONE]``).

Checked against the sources of the sglang 0.5.23 wheel,
``python/sglang/srt/entrypoints/openai/`` (``protocol.py``, ``serving_base.py``,
``serving_chat.py``, ``serving_completions.py``, ``usage_processor.py``,
``sse_utils.py``, ``utils.py``) and ``entrypoints/http_server.py``; docs/emulator.md
lists the facts. The version rules (which request fields the OpenAI layer of a version
knows; a key it does not know is dropped, as pydantic ignores extra keys) come from the
same files of the 0.4.10.post2, 0.5.1, 0.5.6-0.5.9, 0.5.20 and 0.5.22 wheels. The rank
pin fields then go through /generate's own rules (:mod:`.generate_request`).

The emulator has no tokenizer and no chat template: messages are rendered with
:func:`render_messages` (a stand-in template) and the rendered text is the prompt, so
``prompt_tokens`` is what /generate reports for that text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from http import HTTPStatus
from typing import Any, Literal

from scheduler.sglang_versions import (
    OPENAI_DP_RANK_SINCE,
    OPENAI_ROUTED_EXPERTS_SINCE,
    ROUTED_DP_RANK_SINCE,
    SglangVersion,
)

#: ``routed_experts_start_len`` and chat's ``return_meta_info``: 0.5.20 has them, 0.5.9
#: does not (nothing in between was checked).
OPENAI_START_LEN_SINCE = SglangVersion.parse("0.5.20")
RETURN_META_INFO_SINCE = OPENAI_START_LEN_SINCE
#: The ``X-Data-Parallel-Rank`` header (``serving_base.extract_routed_dp_rank_from_header``,
#: over the body's rank): 0.5.20 has it, 0.5.9 does not.
DP_RANK_HEADER_SINCE = ROUTED_DP_RANK_SINCE
DP_RANK_HEADER = "X-Data-Parallel-Rank"
#: SGLang's ``DEFAULT_MODEL_NAME``: the ``model`` of a request that names none.
DEFAULT_MODEL_NAME = "default"
#: CompletionRequest's ``max_tokens`` default.
COMPLETION_DEFAULT_MAX_TOKENS = 16
#: What a chat message's role may be (``protocol.py``: ``user``, or a generic role,
#: matched case-insensitively).
GENERIC_ROLES = ("system", "assistant", "tool", "function", "developer", "latest_reminder", "root")
#: Content parts a text-only model refuses (``serving_chat._MEDIA_CONTENT_PART_TYPES``).
MEDIA_PART_TYPES = ("image_url", "video_url", "audio_url")
#: ``type`` of the errors: FastAPI's validation handler (``HTTPStatus.BAD_REQUEST.phrase``),
#: ``create_error_response``'s default, and the ValueError caught by ``handle_request``.
VALIDATION_ERROR = "Bad Request"
BAD_REQUEST_ERROR = "BadRequestError"
CONVERSION_ERROR = "BadRequest"

Kind = Literal["chat", "completion"]


class OpenAIRefusal(Exception):
    """An OpenAI request SGLang refuses: ``body`` (its ``ErrorResponse``) with ``status``."""

    def __init__(self, message: str, status: int = 400, err_type: str = BAD_REQUEST_ERROR):
        super().__init__(message)
        self.status = status
        self.body = error_body(message, err_type, status)


def error_body(message: str, err_type: str, status: int) -> dict[str, Any]:
    """SGLang's ``ErrorResponse``: ``{"object": "error", "message", "type", "param", "code"}``."""
    return {"object": "error", "message": message, "type": err_type, "param": None, "code": status}


def _invalid(loc: tuple[str | int, ...], msg: str, kind: str = "value_error") -> OpenAIRefusal:
    """A body FastAPI's request validation refuses (400, type ``Bad Request``). The message
    names the field as pydantic does; its wording is the emulator's."""
    error = {"type": kind, "loc": ("body", *loc), "msg": msg}
    return OpenAIRefusal(f"1 validation error: {[error]}", 400, VALIDATION_ERROR)


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class OpenAIRequest:
    """An OpenAI request as the emulated version reads it: the /generate body SGLang
    would build from it and what its response needs."""

    kind: Kind
    model: str
    generate_body: dict[str, Any]
    stream: bool
    include_usage: bool = False
    continuous_usage_stats: bool = False
    #: ``return_routed_experts`` as the version reads it (``sglext.routed_experts``).
    return_routed_experts: bool = False
    #: Chat: the answer's choice carries /generate's ``meta_info`` (and sglext loses
    #: ``routed_experts``, which is in there).
    return_meta_info: bool = False
    #: Completions with ``echo``: the prompt, put before the generated text.
    echo: str | None = None
    #: What the corpus class is looked up by (chat: the last user message's text).
    class_text: str | None = None
    #: The field the request log names when the header pinned the rank.
    pinned_field: str | None = None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _load(raw: bytes, content_type: str) -> dict[str, Any]:
    """The JSON object of the body, after SGLang's ``validate_json_request``."""
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        raise OpenAIRefusal(
            "1 validation error: [{'type': 'value_error', 'loc': ('header', 'content-type'), "
            "'msg': \"Unsupported Media Type: Only 'application/json' is allowed\"}]",
            400,
            VALIDATION_ERROR,
        )
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _invalid((0,), f"JSON decode error ({e})", "json_invalid") from e
    if not isinstance(body, dict):
        raise _invalid((), "Input should be a valid dictionary or object", "model_attributes_type")
    return body


def _check(body: dict[str, Any], key: str, ok: Any, expected: str) -> Any:
    """``body[key]`` if absent or ``ok(value)``; else a validation error naming it."""
    value = body.get(key)
    if value is not None and not ok(value):
        raise _invalid((key,), f"Input should be {expected}")
    return value


def _common(
    kind: Kind, body: dict[str, Any], version: SglangVersion, served_model: str
) -> OpenAIRequest:
    """The request as far as both endpoints read it the same way: sampling fields
    (accepted and checked; the emulator runs no sampler), the stream options, the model,
    and the SGLang extras copied into the /generate body (``generate_body``, which the
    caller completes)."""
    model = _check(body, "model", lambda v: isinstance(v, str), "a valid string")
    model = DEFAULT_MODEL_NAME if model is None else model
    _check_model(model, served_model)
    for key in ("temperature", "top_p", "frequency_penalty", "presence_penalty"):
        _check(body, key, _is_number, "a valid number")
    _check(body, "seed", _is_int, "a valid integer")
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise _invalid(("stop",), "Input should be a valid string or a list of strings")
    n = _check(body, "n", _is_int, "a valid integer")
    if n is not None and n != 1:
        raise OpenAIRefusal(f"n={n}: the emulator generates one choice per request (n=1)")
    for key in ("stream", "return_routed_experts", "echo", "return_meta_info"):
        _check(body, key, lambda v: isinstance(v, bool), "a valid boolean")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _invalid(("stream_options",), "Input should be a valid dictionary or object")
    options = options or {}
    for key in ("include_usage", "continuous_usage_stats"):
        _check(options, key, lambda v: isinstance(v, bool), "a valid boolean")
    if body.get("logprobs") not in (None, False):
        raise OpenAIRefusal("logprobs: the emulator runs no model, so it has no logprobs")
    generate: dict[str, Any] = {"stream": bool(body.get("stream", False))}
    for key in ("rid", "bootstrap_host", "bootstrap_port", "bootstrap_room"):
        if body.get(key) is not None:
            generate[key] = body[key]
    if version >= OPENAI_DP_RANK_SINCE:  # /generate's rules then pick the field
        for key in ("routed_dp_rank", "data_parallel_rank", "disagg_prefill_dp_rank"):
            if body.get(key) is not None:
                generate[key] = body[key]
    routed = bool(body.get("return_routed_experts")) and version >= OPENAI_ROUTED_EXPERTS_SINCE
    if routed:
        generate["return_routed_experts"] = True
        if version >= OPENAI_START_LEN_SINCE and body.get("routed_experts_start_len") is not None:
            generate["routed_experts_start_len"] = body["routed_experts_start_len"]
    return OpenAIRequest(
        kind=kind,
        model=model,
        generate_body=generate,
        stream=generate["stream"],
        include_usage=bool(options.get("include_usage")),
        continuous_usage_stats=bool(options.get("continuous_usage_stats")),
        return_routed_experts=routed,
    )


def _check_model(model: str, served_model: str) -> None:
    """SGLang does not check ``model`` against the served model (any name is answered and
    echoed); only ``base:adapter`` asks for a LoRA adapter, which fails without LoRA."""
    if ":" not in model or model == served_model:
        return
    if model.startswith(served_model + ":"):
        adapter = model[len(served_model) + 1 :].strip()
    else:
        adapter = model.split(":", 1)[1].strip()
    if adapter:
        raise OpenAIRefusal(
            f"LoRA adapter '{adapter}' was requested, but LoRA is not enabled. Please launch "
            "the server with --enable-lora flag and preload adapters using --lora-paths or "
            "/load_lora_adapter endpoint."
        )


def _header_rank(
    generate: dict[str, Any], header: str | None, version: SglangVersion
) -> str | None:
    """Apply ``X-Data-Parallel-Rank`` (over the body's rank, 0.5.20 on); returns the
    pinned field to log when it did."""
    if header is None or version < DP_RANK_HEADER_SINCE:
        return None
    try:
        rank = int(header)
    except ValueError:
        raise OpenAIRefusal(
            f"Invalid X-Data-Parallel-Rank header: must be an integer, got '{header}'", 400, "400"
        ) from None
    generate.pop("data_parallel_rank", None)
    generate["routed_dp_rank"] = rank
    return DP_RANK_HEADER


def _max_tokens(body: dict[str, Any], key: str) -> int | None:
    return _check(body, key, _is_int, "a valid integer")


def parse_completion(
    raw: bytes,
    content_type: str,
    rank_header: str | None,
    version: SglangVersion,
    served_model: str,
) -> OpenAIRequest:
    """A ``/v1/completions`` body as ``version`` reads it; raises :class:`OpenAIRefusal`."""
    body = _load(raw, content_type)
    if "prompt" not in body:
        raise _invalid(("prompt",), "Field required", "missing")
    prompt = body["prompt"]
    common = _common("completion", body, version, served_model)
    max_tokens = _max_tokens(body, "max_tokens")
    max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    if max_tokens <= 0:
        raise _invalid(("max_tokens",), "Value error, max_tokens must be positive")
    ids = isinstance(prompt, list) and all(_is_int(t) for t in prompt)
    batch = isinstance(prompt, list) and not ids
    if not (isinstance(prompt, str) or ids or batch):
        raise _invalid(("prompt",), "Input should be a string, a list of strings or token ids")
    if not prompt or (batch and all(not p for p in prompt)):
        raise OpenAIRefusal("Prompt cannot be empty")
    if batch:
        raise OpenAIRefusal("batch requests (a list of prompts) are not supported by the emulator")
    echo = None
    if body.get("echo"):
        if not isinstance(prompt, str):
            raise OpenAIRefusal("echo of a token-id prompt: the emulator has no tokenizer")
        echo = prompt
    generate = common.generate_body
    generate["text" if isinstance(prompt, str) else "input_ids"] = prompt
    generate["sampling_params"] = {"max_new_tokens": max_tokens}
    return replace(
        common,
        echo=echo,
        class_text=prompt if isinstance(prompt, str) else None,
        pinned_field=_header_rank(generate, rank_header, version),
    )


def _message_text(index: int, message: Any) -> tuple[str, str]:
    """(role, text) of one chat message; text parts are joined with newlines."""
    if not isinstance(message, dict):
        raise _invalid(("messages", index), "Input should be a valid dictionary or object")
    role = message.get("role")
    if not isinstance(role, str):
        raise _invalid(("messages", index, "role"), "'role' must be a string")
    if role != "user":
        if role.lower() not in GENERIC_ROLES:
            allowed = ", ".join(repr(r) for r in ("user", *GENERIC_ROLES))
            raise _invalid(("messages", index, "role"), f"'role' must be one of {allowed}")
        role = role.lower()
    content = message.get("content")
    if content is None:
        if role == "user":
            raise _invalid(("messages", index, "content"), "Field required", "missing")
        return role, ""
    if isinstance(content, str):
        return role, content
    if not isinstance(content, list):
        raise _invalid(("messages", index, "content"), "Input should be a string or a list")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in MEDIA_PART_TYPES:
            raise OpenAIRefusal(
                f"Model only supports text input; received unsupported content type '{kind}'."
            )
        if kind != "text" or not isinstance(part.get("text"), str):
            raise _invalid(
                ("messages", index, "content", j),
                "the emulator takes text parts only: {'type': 'text', 'text': str}",
            )
        texts.append(part["text"])
    return role, "\n".join(texts)


def render_messages(messages: list[tuple[str, str]]) -> str:
    """The emulator's stand-in chat template: ``<|role|>\\ncontent\\n`` per message, then
    the generation prompt ``<|assistant|>\\n``."""
    return "".join(f"<|{role}|>\n{text}\n" for role, text in messages) + "<|assistant|>\n"


def parse_chat(
    raw: bytes,
    content_type: str,
    rank_header: str | None,
    version: SglangVersion,
    served_model: str,
) -> OpenAIRequest:
    """A ``/v1/chat/completions`` body as ``version`` reads it; raises
    :class:`OpenAIRefusal`."""
    body = _load(raw, content_type)
    if "messages" not in body:
        raise _invalid(("messages",), "Field required", "missing")
    messages = body["messages"]
    if not isinstance(messages, list):
        raise _invalid(("messages",), "Input should be a valid list", "list_type")
    rendered = [_message_text(i, m) for i, m in enumerate(messages)]
    common = _common("chat", body, version, served_model)
    if not messages:
        raise OpenAIRefusal("Messages cannot be empty.")
    # SGLang: max_new_tokens = max_completion_tokens or max_tokens (a 0 is unset)
    max_tokens = _max_tokens(body, "max_completion_tokens") or _max_tokens(body, "max_tokens")
    meta = bool(body.get("return_meta_info")) and version >= RETURN_META_INFO_SINCE
    if meta and common.stream:
        raise OpenAIRefusal(
            "return_meta_info is not supported with streaming. Please set stream=false when "
            "using return_meta_info=true.",
            400,
            CONVERSION_ERROR,
        )
    generate = common.generate_body
    input_ids = _check(
        body,
        "input_ids",
        lambda v: isinstance(v, list) and all(_is_int(t) for t in v),
        "a valid list of integers",
    )
    if input_ids is not None:  # SGLang: precomputed prompt ids bypass the template
        generate["input_ids"] = input_ids
    else:
        generate["text"] = render_messages(rendered)
    if max_tokens is not None:
        generate["sampling_params"] = {"max_new_tokens": max_tokens}
    users = [text for role, text in rendered if role == "user"]
    return replace(
        common,
        return_meta_info=meta,
        class_text=users[-1] if users and input_ids is None else None,
        pinned_field=_header_rank(generate, rank_header, version),
    )


# --------------------------------------------------------------------------- responses


def _dump(data: Any) -> str:
    """Compact JSON, non-ASCII kept, as pydantic's ``model_dump_json`` and msgspec write it."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def _event(data: Any) -> bytes:
    return f"data: {_dump(data)}\n\n".encode()


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """SGLang's ``UsageInfo`` (no cache report, no reasoning tokens), every field."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
        "reasoning_tokens": 0,
        "completion_tokens_details": None,
    }


def stream_error_event(message: str, status: int) -> bytes:
    """SGLang's ``create_streaming_error_response`` as an SSE event: ``{"error":
    ErrorResponse}``, written by ``json.dumps`` (with its default spaces), the type the
    status's name (``INTERNAL_SERVER_ERROR``)."""
    try:
        name = HTTPStatus(status).name
    except ValueError:
        name = str(status)
    return f"data: {json.dumps({'error': error_body(message, name, status)})}\n\n".encode()


class OpenAIFormat:
    """One request's OpenAI answer, from /generate's (``answer``), or its SSE events, one
    native chunk at a time (``chunks``), then ``end`` before ``[DONE]``.

    Stream, as SGLang 0.5.23 writes it. Chat: a first chunk with ``delta.role``
    ``"assistant"`` and ``content`` ``""``, one chunk per non-empty text delta, then a
    chunk with the ``finish_reason`` and an empty delta (every delta has
    ``reasoning_content: null``; ``usage`` is omitted unless continuous). Completions:
    one chunk per native chunk (``text`` the delta, ``finish_reason`` on the last,
    ``usage: null`` unless continuous). Then, for both, a chunk with ``choices: []`` and
    ``sglext.routed_experts`` when asked, and one with ``choices: []`` and ``usage``
    when ``stream_options.include_usage``. A native abort with a status (PD KV transfer
    failures) is an ``{"error": ...}`` event and ends the chunks (the usage chunk still
    follows).
    """

    def __init__(self, request: OpenAIRequest, created: int, incremental: bool = False) -> None:
        self.request = request
        self.created = created
        #: The native chunks carry only their new text (``--incremental-streaming-output``).
        self.incremental = incremental
        self._object = "chat.completion.chunk" if request.kind == "chat" else "text_completion"
        self._id = ""
        self._sent_text = 0  # characters of the cumulative text already sent
        self._first = True
        self._finish: str | None = None
        self._aborted = False
        self._prompt_tokens = 0
        self._completion_tokens = 0
        self._routed: str | None = None

    # ---------------------------------------------------------------- unary

    def answer(self, content: dict[str, Any]) -> dict[str, Any]:
        """The unary response from /generate's answer ``content``."""
        r, meta = self.request, content["meta_info"]
        finish = meta["finish_reason"]
        text = content["text"]
        if r.kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "reasoning_content": None},
                "logprobs": None,
                "finish_reason": finish["type"] if finish else None,
                "matched_stop": None,
            }
            if r.return_meta_info:
                choice["meta_info"] = meta
        else:
            choice = {
                "index": 0,
                "text": (r.echo or "") + text,
                "logprobs": None,
                "finish_reason": finish["type"] if finish else None,
                "matched_stop": None,
            }
        response: dict[str, Any] = {
            "id": meta["id"],
            "object": "chat.completion" if r.kind == "chat" else "text_completion",
            "created": self.created,
            "model": r.model,
            "choices": [choice],
            "usage": usage(meta["prompt_tokens"], meta["completion_tokens"]),
            "metadata": {"weight_version": "default"},
        }
        routed = meta.get("routed_experts") if r.return_routed_experts else None
        if routed is not None and not r.return_meta_info:
            response["sglext"] = {"routed_experts": routed}
        return response

    # ---------------------------------------------------------------- stream

    def refused(self, message: str, status: int) -> dict[str, Any]:
        """The body of a request refused before it ran (``BadRequestError`` for a 400)."""
        return error_body(message, BAD_REQUEST_ERROR if status == 400 else str(status), status)

    def stream_error(self, message: str, status: int) -> bytes:
        """The event of an error after the stream began."""
        return stream_error_event(message, status)

    def chunks(self, content: dict[str, Any]) -> list[bytes]:
        """The SSE events for one native stream chunk."""
        if self._aborted:
            return []
        meta = content["meta_info"]
        self._id = meta["id"]
        self._prompt_tokens = meta.get("prompt_tokens", 0)
        self._completion_tokens = meta.get("completion_tokens", 0)
        if meta.get("routed_experts") is not None:
            self._routed = meta["routed_experts"]
        finish = meta.get("finish_reason")
        finish_type = finish["type"] if finish else None
        if finish_type == "abort" and finish.get("status_code") is not None:
            self._aborted = True
            message = finish.get("message", "Generation aborted.")
            return [stream_error_event(message, int(finish["status_code"]))]
        text = content["text"]
        if self.incremental:
            delta = text
        else:
            delta, self._sent_text = text[self._sent_text :], len(text)
        continuous = (
            usage(self._prompt_tokens, self._completion_tokens)
            if self.request.continuous_usage_stats
            else None
        )
        first, self._first = self._first, False
        if self.request.kind == "completion":
            if first and self.request.echo:
                delta = self.request.echo + delta
            choice = {
                "index": 0,
                "text": delta,
                "logprobs": None,
                "finish_reason": finish_type,
                "matched_stop": None,
            }
            return [_event(self._chunk([choice], usage=continuous))]
        events = []
        if finish_type is not None:
            self._finish = finish_type
        if first:
            delta_role = {"reasoning_content": None, "role": "assistant", "content": ""}
            events.append(_event(self._chat_chunk(delta_role)))
        if delta:
            events.append(
                _event(self._chat_chunk({"reasoning_content": None, "content": delta}, continuous))
            )
        return events

    def end(self) -> list[bytes]:
        """The events after the last native chunk, before ``data: [DONE]``."""
        r, events = self.request, []
        if r.kind == "chat" and self._finish is not None and not self._aborted:
            events.append(_event(self._chat_chunk({"reasoning_content": None}, None, self._finish)))
        if r.return_routed_experts and self._routed is not None:
            events.append(_event(self._chunk([], sglext={"routed_experts": self._routed})))
        if r.include_usage:
            total = usage(self._prompt_tokens, self._completion_tokens)
            if r.kind == "completion":  # written with exclude_none
                total = {k: v for k, v in total.items() if v is not None}
                events.append(_event({**self._head(), "choices": [], "usage": total}))
            else:
                events.append(_event(self._chunk([], usage=total)))
        return events

    def _head(self) -> dict[str, Any]:
        return {"id": self._id, "object": self._object, "created": self.created}

    def _chunk(
        self,
        choices: list[dict[str, Any]],
        usage: dict[str, Any] | None = None,
        sglext: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A pydantic stream response (``ChatCompletionStreamResponse`` or
        ``CompletionStreamResponse``): ``usage`` always written, ``sglext`` only when set."""
        chunk = {**self._head(), "model": self.request.model, "choices": choices, "usage": usage}
        if sglext is not None:
            chunk["sglext"] = sglext
        return chunk

    def _chat_chunk(
        self,
        delta: dict[str, Any],
        usage: dict[str, Any] | None = None,
        finish_reason: str | None = None,
    ) -> dict[str, Any]:
        """A chat chunk as ``sse_utils.build_sse_content`` writes it (msgspec, ``usage``
        left out when unset)."""
        choice = {
            "index": 0,
            "delta": delta,
            "logprobs": None,
            "finish_reason": finish_reason,
            "matched_stop": None,
        }
        chunk: dict[str, Any] = {**self._head(), "model": self.request.model, "choices": [choice]}
        if usage is not None:
            chunk["usage"] = usage
        return chunk
