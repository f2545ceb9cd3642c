"""SGLang's ``--api-key`` check, as SGLang 0.5.23 makes it (pure; no aiohttp).

``sgl-project/sglang:python/sglang/srt/utils/auth.py`` (``decide_request_auth``, normal
endpoints; the emulator serves none of SGLang's admin endpoints): with a key set, every
request needs ``Authorization: Bearer KEY`` (scheme case-insensitive, one space, the key
compared in constant time), except ``OPTIONS`` and paths starting with ``/health``,
``/ready`` or ``/metrics``. Anything else, including unknown paths and the emulator's
``/admin`` endpoints, is answered 401 ``{"error":"Unauthorized"}``. See docs/emulator.md.
"""

from __future__ import annotations

import re
import secrets

#: Path prefixes SGLang leaves open for probes and Prometheus.
EXEMPT_PREFIXES = ("/health", "/ready", "/metrics")
#: SGLang's answer to a missing or wrong key (ORJSONResponse, status 401).
UNAUTHORIZED_STATUS = 401
UNAUTHORIZED_BODY = {"error": "Unauthorized"}

_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")


def check_api_key(key: str | None) -> str | None:
    """The key to require, or None for none (SGLang treats an empty key as no key).

    Refuses keys SGLang could never match: non-ASCII (its ``secrets.compare_digest`` on
    ``str`` raises, every request would fail with 500) or with spaces or control characters.
    """
    if not key:
        return None
    if _VISIBLE_ASCII.fullmatch(key) is None:
        raise ValueError(
            "--api-key must be visible ASCII characters without spaces (a client could not "
            "send it otherwise); e.g. the output of `openssl rand -hex 32`"
        )
    return key


def is_authorized(method: str, path: str, authorization: str | None, api_key: str) -> bool:
    """SGLang's decision for a normal endpoint when ``--api-key`` is ``api_key``."""
    if method == "OPTIONS" or path.startswith(EXEMPT_PREFIXES):
        return True
    if not authorization:
        return False
    parts = authorization.split(" ", 1)
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return False
    # Bytes, so a non-ASCII header is a plain mismatch (SGLang answers it 500).
    given = parts[1].encode("utf-8", "surrogateescape")
    return secrets.compare_digest(given, api_key.encode("ascii"))
