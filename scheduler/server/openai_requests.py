"""OpenAI-shaped requests (``/v1/chat/completions``, ``/v1/completions``) as scheduler
jobs, and the scheduler's outcomes as OpenAI-shaped errors (pure: no network code).

A request is checked as far as the scheduler needs it (the prompt, the sampling fields
it bounds, ``n``, ``stream``) and otherwise forwarded as the client sent it: SGLang's
OpenAI layer applies the model's chat template and reads every other field (tools,
``response_format``, ``logprobs`` ...). The fields the scheduler sets itself (the rid, the
rank pin, the PD bootstrap fields, ``return_routed_experts``) are dropped from the
client's body.

What prediction reads: for a completion, the prompt; for a chat, the **last user turn**.
The domain classifier and the text-to-routing predictors are trained on single prompts,
and the last user turn is the closest thing a chat has to one: a system prompt is
usually the same boilerplate for every request of an application (it would pull all of
them to one class), and earlier turns are what the conversation was, not what this
request asks. The prompt's token estimate covers every message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scheduler.errors import RequestError
from scheduler.server.backend import CHAT, COMPLETIONS
from scheduler.server.cluster import ClusterState
from scheduler.server.config import ServerConfig
from scheduler.server.core import Job, estimate_tokens, quote, validate

#: Chat roles SGLang's ChatCompletionRequest accepts.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
#: Fields the scheduler sets on the SGLang request; the client's are dropped.
SCHEDULER_FIELDS = (
    "rid",
    "routed_dp_rank",
    "data_parallel_rank",
    "disagg_prefill_dp_rank",
    "bootstrap_host",
    "bootstrap_port",
    "bootstrap_room",
    "bootstrap_pair_key",
    "return_routed_experts",
    "routed_experts_start_len",
    "stream",
)
#: The scheduler's own request fields (the openai package's ``extra_body``); not
#: forwarded.
EXTENSION_FIELDS = ("class_hint", "conversation_id")
#: Messages a chat turn adds around its content in a chat template (a rough count).
TEMPLATE_TOKENS_PER_MESSAGE = 4

#: HTTP status, OpenAI error type and code of each scheduler outcome.
ERRORS = {
    "invalid": (400, "invalid_request_error", None),
    "unauthorized": (401, "invalid_request_error", "invalid_api_key"),
    "overloaded": (429, "rate_limit_error", "overloaded"),
    "refused_deadline": (504, "timeout_error", "timeout"),
    "deadline": (504, "timeout_error", "timeout"),
    "client_deadline": (504, "timeout_error", "timeout"),
    "backend_error": (502, "server_error", "backend_error"),
    "internal": (500, "server_error", "internal_error"),
}


#: A model name that is not served: 404, as OpenAI answers it.
MODEL_NOT_FOUND = (404, "invalid_request_error", "model_not_found")


class ModelNotFound(RequestError):
    """An unknown ``model``: an invalid request, answered 404 over HTTP."""

    def __init__(self, message: str) -> None:
        super().__init__("invalid", message)


def error_body(error: RequestError | str, message: str = "") -> tuple[int, dict[str, Any]]:
    """(HTTP status, ``{"error": {"message", "type", "param", "code"}}``) of a
    RequestError (or an outcome and a message) as OpenAI's API answers errors."""
    if isinstance(error, RequestError):
        outcome, message = error.outcome, str(error)
        status, kind, code = (
            MODEL_NOT_FOUND if isinstance(error, ModelNotFound) else ERRORS[outcome]
        )
    else:
        status, kind, code = ERRORS.get(error, ERRORS["internal"])
    return status, {"error": {"message": message, "type": kind, "param": None, "code": code}}


@dataclass
class OpenAIJob:
    job: Job
    stream: bool


def _bad(message: str) -> RequestError:
    return RequestError("invalid", message)


def _text_of(content: Any, where: str) -> str:
    """The text of a message's content: a string, or the ``text`` parts of a list."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise _bad(f"{where}: each content part must be an object with a type")
            if part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise _bad(f"{where}: a text part needs a string text")
                texts.append(part["text"])
        return "\n".join(texts)
    raise _bad(f"{where}: content must be a string or a list of parts")


def _chat_prompt(body: dict[str, Any]) -> tuple[str, str]:
    """(the text prediction reads, the text of every message)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list")
    last_user, every = "", []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"{where} must be an object")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise _bad(f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {quote(role)}")
        text = _text_of(message.get("content"), where)
        every.append(text)
        if role == "user" and text.strip():
            last_user = text
    every_text = "\n".join(every)
    return last_user or every_text, every_text


def _completion_prompt(body: dict[str, Any]) -> tuple[str | None, list[int] | None]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, list) and prompt and all(isinstance(i, int) for i in prompt):
        return None, prompt
    if isinstance(prompt, list) and len(prompt) > 1:
        raise _bad(
            "prompt holds several prompts; send one request per prompt (each is scheduled "
            "on its own rank)"
        )
    raise _bad("prompt must be a string or a list of token ids")


def _number(body: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
        raise _bad(f"{key} must be a number, got {quote(value)}")
    return value


def _sampling(body: dict[str, Any], endpoint: str) -> dict[str, Any]:
    """The sampling fields the scheduler checks, in GenerateRequest terms."""
    sampling: dict[str, Any] = {}
    keys = ("max_completion_tokens", "max_tokens") if endpoint == CHAT else ("max_tokens",)
    for key in keys:
        value = _number(body, key, int)
        if value is not None:
            sampling["max_new_tokens"] = value
            break
    for key in ("temperature", "top_p"):
        value = _number(body, key, (int, float))
        if value is not None:
            sampling[key] = float(value)
    for key in ("top_k", "seed"):
        value = _number(body, key, int)
        if value is not None:
            sampling[key] = value
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _bad("stop must be a string or a list of strings")
        sampling["stop"] = stop
    n = body.get("n")
    if n is not None and n != 1:
        raise _bad(f"n must be 1, got {quote(n)}: each choice would run on its own rank")
    return sampling


def parse(
    endpoint: str,
    body: Any,
    config: ServerConfig,
    cluster: ClusterState,
    models: list[str],
    request_id: str = "",
) -> OpenAIJob:
    """The :class:`Job` of an OpenAI request body (``endpoint``: backend.CHAT or
    COMPLETIONS), checked as ``core.validate`` checks a GenerateRequest. Raises
    RequestError ("invalid"; :class:`ModelNotFound` when ``model`` is not in ``models``)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model is required (GET /v1/models lists them)")
    if model not in models:
        raise ModelNotFound(
            f"the model {quote(model)} does not exist; this scheduler serves "
            f"{', '.join(quote(m) for m in models)}",
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad(f"stream must be true or false, got {quote(stream)}")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("stream_options must be an object")
    extensions = {key: body.get(key) or "" for key in EXTENSION_FIELDS}
    for key, value in extensions.items():
        if not isinstance(value, str):
            raise _bad(f"{key} must be a string")
    text: str | None
    ids: list[int] | None = None
    conversation = ""
    if endpoint == CHAT:
        text, conversation = _chat_prompt(body)
        if len(conversation) > config.server.max_prompt_chars:
            raise _bad(
                f"the messages have {len(conversation)} characters; the limit is "
                f"{config.server.max_prompt_chars}"
            )
    else:
        text, ids = _completion_prompt(body)
    fields = {
        "request_id": request_id,
        "text": text,
        "input_ids": ids,
        "sampling": _sampling(body, endpoint),
        **extensions,
    }
    job = validate(config, cluster, fields)
    if endpoint == CHAT:
        extra = TEMPLATE_TOKENS_PER_MESSAGE * len(body["messages"])
        job.prompt_tokens = estimate_tokens(conversation) + extra
    drop = (*SCHEDULER_FIELDS, *EXTENSION_FIELDS) + (() if stream else ("stream_options",))
    job.endpoint = endpoint
    job.openai = {k: v for k, v in body.items() if k not in drop}
    return OpenAIJob(job, stream)


__all__ = ["CHAT", "COMPLETIONS", "ERRORS", "ModelNotFound", "OpenAIJob", "error_body", "parse"]
