"""Prompt domains and the plan classes they map to (pure).

The domain classifier predicts one of the prompt corpus's domains; a placement's plan
has classes of its workload profile. Where the profile's classes are ESFT's domains
(the real per-class routing we have, DeepSeek-V2-Lite), ESFT's tasks stand in for the
corpus domains as :data:`ESFT_STAND_INS` says; it is a convention, not a claim that the
routing of (say) ESFT's legal task resembles that of math prompts. The emulator draws a
request's routing by that map and the server maps predicted domains by it, unless the
configuration gives its own ``class_map``.
"""

from __future__ import annotations

from collections.abc import Iterable

#: Domains of the prompt corpus, in the order that settles a prompt listed under several.
DOMAINS = ("code", "math", "chat", "general")
#: ESFT domain -> the corpus domain whose requests draw from its routing.
ESFT_STAND_INS = {"translation": "code", "law": "math", "intent": "chat", "summary": "general"}


def domain_rank(domain: str) -> int:
    """Which of several domains a prompt listed under all of them belongs to: the lowest
    rank (:data:`DOMAINS` order; unknown domains last)."""
    return DOMAINS.index(domain) if domain in DOMAINS else len(DOMAINS)


def default_class_map(classes: Iterable[str]) -> dict[str, str]:
    """Domain -> class: :data:`ESFT_STAND_INS` when the classes are ESFT domains, else the
    domains that are class names."""
    names = set(classes)
    if names <= set(ESFT_STAND_INS):
        return {d: esft for esft, d in ESFT_STAND_INS.items() if esft in names}
    return {d: d for d in DOMAINS if d in names}
