"""SGLang's ``/generate`` responses read at wire speed, without a Python string of the
routed experts and without re-parsing the cumulative text of every streamed chunk.

Pure (bytes in, values out), so the serving loop's cost per chunk is measurable alone.

- :func:`split_routed`: a response body (or a final SSE event) without its
  ``meta_info.routed_experts`` value, and that value as raw base64 bytes. A DeepSeek-V3
  answer of 2,000 tokens carries about 5 MB of them; JSON-parsing them on the serving
  loop is what froze it.
- :class:`SSEEvents`: ``data:`` events split out of an HTTP body read in chunks, with a
  size limit per event set by the caller (aiohttp's line reader stops at 512 KiB, which
  a final chunk with routed experts passes after about 620 tokens).
- :class:`StreamDelta`: the new text and token ids of each streamed chunk. SGLang
  streams the cumulative text and ids (unless ``--incremental-streaming-output``): this
  compares the bytes already seen (a memcmp) and decodes only the new tail, so the cost
  per chunk does not grow with the stream's length.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

_ROUTED_KEY = b'"routed_experts"'
_SPACE = b" \t\r\n"
_KEY_TEXT = b'"text"'
_KEY_IDS = b'"output_ids"'
_NUMBER_LIST = re.compile(rb"[\d\s,\-]*")


class WireError(ValueError):
    """A body or event that is not the JSON SGLang sends."""


def loads(raw: bytes | bytearray | memoryview | str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise WireError(f"not JSON ({e})") from e


def _value_at(raw: bytes, key_end: int) -> int:
    """Index of the value after a key ending at ``key_end`` (past ``:`` and blanks), or
    -1 when no ``:`` follows."""
    n, i = len(raw), key_end
    while i < n and raw[i] in _SPACE:
        i += 1
    if i >= n or raw[i] != ord(":"):
        return -1
    i += 1
    while i < n and raw[i] in _SPACE:
        i += 1
    return i


def split_routed(raw: bytes) -> tuple[bytes, bytes | None]:
    """``raw`` with the value of its last ``"routed_experts"`` key replaced by ``null``,
    and that value's base64 bytes (None when absent or not a string).

    The key cannot occur inside a JSON string (its quotes would be escaped there), and
    base64 holds no quote or backslash, so two ``find`` calls delimit the value.
    """
    key = raw.rfind(_ROUTED_KEY)
    if key < 0:
        return raw, None
    i = _value_at(raw, key + len(_ROUTED_KEY))
    if i < 0 or i >= len(raw) or raw[i] != ord('"'):
        return raw, None
    end = raw.find(b'"', i + 1)
    if end < 0:
        raise WireError("unterminated routed_experts string")
    return raw[:i] + b"null" + raw[end + 1 :], raw[i + 1 : end]


class SSEEvents:
    """Feed body bytes, take complete ``data:`` payloads (bytes, ``[DONE]`` included).

    ``max_event_bytes``: an event growing past it raises :class:`WireError` (size it from
    the model shape and the longest allowed sequence; see ``core.max_event_bytes``).
    """

    def __init__(self, max_event_bytes: int) -> None:
        self.max_event_bytes = max_event_bytes
        self._buf = bytearray()
        self._scanned = 0

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        events: list[bytes] = []
        start = 0
        search = max(0, self._scanned - 1)
        while True:
            end = buf.find(b"\n", search)
            if end < 0:
                break
            line = bytes(buf[start:end]).strip()
            start = search = end + 1
            if line.startswith(b"data:"):
                events.append(line[5:].lstrip())
        if start:
            del buf[:start]
        self._scanned = len(buf)
        if len(buf) > self.max_event_bytes:
            raise WireError(f"a streamed event passed {self.max_event_bytes} bytes without ending")
        return events

    def close(self) -> list[bytes]:
        """The last event when the body ended without a newline."""
        rest = bytes(self._buf).strip()
        self._buf.clear()
        return [rest[5:].lstrip()] if rest.startswith(b"data:") else []


def _string_end(raw: bytes, start: int) -> int:
    """Index of the closing quote of the JSON string whose content starts at ``start``."""
    i = start
    while True:
        q = raw.find(b'"', i)
        if q < 0:
            raise WireError("unterminated string")
        back = q - 1
        while back >= start and raw[back] == 0x5C:  # backslash
            back -= 1
        if (q - 1 - back) % 2 == 0:
            return q
        i = q + 1


def _value_start(raw: bytes, key: bytes, open_char: int, begin: int = 0) -> int:
    """Index just after the opening ``open_char`` of ``key``'s value, or -1."""
    k = raw.find(key, begin)
    i = -1 if k < 0 else _value_at(raw, k + len(key))
    if i < 0 or i >= len(raw) or raw[i] != open_char:
        return -1
    return i + 1


class StreamDelta:
    """New (text, ids) of each streamed chunk, cumulative or incremental.

    Which one a chunk is comes from its ``meta_info.completion_tokens``: a cumulative
    chunk holds that many ids, an incremental one only those not relayed yet. The fast
    path needs the chunk to start with its ``"text"`` and ``"output_ids"`` values (as
    SGLang writes them); anything else is parsed in full, which is correct, only slower.
    """

    def __init__(self) -> None:
        # The escaped text content and the id list content of the last chunk, when it
        # was cumulative and read on the fast path (else None: prefix unknown).
        self._text_raw: bytes | None = b""
        self._ids_raw: bytes | None = b""
        self.text_len = 0  # characters relayed
        self.ids_len = 0  # ids relayed
        self.parsed_bytes = 0  # bytes decoded as JSON (docs/server.md, the profile)

    def feed(self, raw: bytes) -> tuple[str, list[int]]:
        fast = self._fast(raw)
        if fast is None:
            fast = self._slow(raw)
        self.text_len += len(fast[0])
        self.ids_len += len(fast[1])
        return fast

    def _fast(self, raw: bytes) -> tuple[str, list[int]] | None:
        t = _value_start(raw, _KEY_TEXT, ord('"'))
        if t < 0 or t > 64:
            return None
        prev_text = self._text_raw
        text_prefix = prev_text is not None and raw.startswith(prev_text, t)
        t_end = _string_end(raw, t + len(prev_text) if text_prefix and prev_text else t)
        o = _value_start(raw, _KEY_IDS, ord("["), t_end)
        if o < 0 or o - t_end > 64:
            return None
        o_end = raw.find(b"]", o)
        if o_end < 0:
            return None
        c = _int_after(raw, _KEY_COMPLETION, o_end)
        ids_raw = raw[o:o_end]
        n = ids_raw.count(b",") + 1 if ids_raw.strip() else 0
        if c is None:
            return None
        if n == c:  # cumulative
            prev_ids = self._ids_raw
            if not text_prefix or prev_ids is None or not ids_raw.startswith(prev_ids):
                return None
            text_new, ids_new = raw[t + len(prev_text or b"") : t_end], ids_raw[len(prev_ids) :]
            if prev_ids and ids_new.strip() and not ids_new.lstrip().startswith(b","):
                return None  # the last id grew digits: not a boundary
            self._text_raw, self._ids_raw = raw[t:t_end], ids_raw
        elif n == c - self.ids_len:  # incremental
            text_new, ids_new = raw[t:t_end], ids_raw
            self._text_raw = self._ids_raw = None
        else:
            return None
        if not _NUMBER_LIST.fullmatch(ids_new):
            return None
        text = loads(b'"' + text_new + b'"') if text_new else ""
        ids = loads(b"[" + ids_new.strip().lstrip(b",") + b"]") if ids_new.strip() else []
        if not isinstance(text, str) or not isinstance(ids, list):
            return None
        self.parsed_bytes += len(text_new) + len(ids_new)
        return text, ids

    def _slow(self, raw: bytes) -> tuple[str, list[int]]:
        chunk = loads(split_routed(raw)[0])
        if not isinstance(chunk, dict):
            raise WireError("a streamed event is not a JSON object")
        self.parsed_bytes += len(raw)
        text = str(chunk.get("text") or "")
        try:
            ids = [int(i) for i in chunk.get("output_ids") or []]
        except (TypeError, ValueError):
            raise WireError("output_ids is not a list of integers") from None
        meta = chunk.get("meta_info")
        done = meta.get("completion_tokens") if isinstance(meta, dict) else None
        self._text_raw = self._ids_raw = None
        cumulative = len(ids) == done if isinstance(done, int) else len(ids) >= self.ids_len > 0
        if cumulative:
            return text[self.text_len :], ids[self.ids_len :]
        return text, ids


_KEY_COMPLETION = b'"completion_tokens"'


def _int_after(raw: bytes, key: bytes, begin: int) -> int | None:
    """The non-negative integer value of the first ``key`` after ``begin``, or None."""
    k = raw.find(key, begin)
    i = -1 if k < 0 else _value_at(raw, k + len(key))
    if i < 0:
        return None
    j = i
    while j < len(raw) and 0x30 <= raw[j] <= 0x39:
        j += 1
    return int(raw[i:j]) if j > i else None


# ------------------------------------------------------------------ OpenAI endpoints


def openai_content(chunk: dict[str, Any]) -> str:
    """The text of the first choice of an OpenAI response or streamed chunk: a chat
    ``message.content`` or ``delta.content``, or a completion's ``text``."""
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    choice = choices[0]
    for key in ("delta", "message"):
        part = choice.get(key)
        if isinstance(part, dict):
            return str(part.get("content") or "")
    return str(choice.get("text") or "")


def openai_meta(chunk: dict[str, Any], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """``meta`` (a new dict if None) updated with what a response or chunk says in
    ``/generate``'s ``meta_info`` terms: ``prompt_tokens``, ``completion_tokens`` (from
    ``usage``) and ``finish_reason`` ``{"type": ...}`` (from the first choice)."""
    meta = {} if meta is None else meta
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        for key in ("prompt_tokens", "completion_tokens"):
            if isinstance(usage.get(key), int):
                meta[key] = usage[key]
    choices = chunk.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        reason = choices[0].get("finish_reason")
        if isinstance(reason, str):
            meta["finish_reason"] = {"type": reason}
    return meta


class OpenAIEvents:
    """The chunks of an OpenAI stream (``/v1/chat/completions`` or ``/v1/completions``)
    as the client should get them, and what the scheduler reads from them.

    SGLang puts the routed experts in a response-level ``sglext.routed_experts`` of a chunk
    of their own (no choices); they are kept in :attr:`routed` and that chunk is not
    relayed (elsewhere the value is cut out: ``null``). The scheduler asks for the usage
    chunk (``stream_options.include_usage``) to learn the completion's length; unless the
    client asked for it too (``keep_usage``), that chunk (no choices, ``usage`` set) is not
    relayed either. Chunks are small: each is parsed in full.
    """

    def __init__(self, keep_usage: bool) -> None:
        self.keep_usage = keep_usage
        self.meta: dict[str, Any] = {}
        self.routed: bytes | None = None

    def feed(self, raw: bytes) -> tuple[str, bytes | None]:
        """(new content text, the event to relay or None) of one ``data:`` payload."""
        routed = None
        if _ROUTED_KEY in raw:
            raw, routed = split_routed(raw)
            self.routed = routed if routed is not None else self.routed
        chunk = loads(raw)
        if not isinstance(chunk, dict):
            raise WireError("a streamed event is not a JSON object")
        openai_meta(chunk, self.meta)
        if not chunk.get("choices"):  # a usage chunk, or SGLang's routed-experts chunk
            wanted = self.keep_usage and chunk.get("usage")
            if not wanted and (routed is not None or chunk.get("usage")):
                return "", None
        return openai_content(chunk), raw
