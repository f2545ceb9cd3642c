"""Which real routing profile an emulated request's experts are drawn from.

A request's class is its GROUND-TRUTH domain: its prompt text is looked up, exactly, in
the prompt corpus (``<data>/prompts/<domain>/*.jsonl.gz``, rows ``{"prompt", "domain"}``);
the domain (code / math / chat / general) selects a class of the routing profile.

The real per-token routing we have with domain labels is ESFT's (DeepSeek-V2-Lite), whose
four domains are Chinese NLP tasks, not ours. They stand in for ours as
``scheduler.class_map.ESFT_STAND_INS`` says (a convention: it gives four distinct, real
per-class distributions).

A prompt not in the corpus (or a request given as token ids) gets the default class:
``general``, or with ``mixture`` a class drawn from the profile's class weights by a hash
of the prompt (so the same prompt always gets the same class).

Pure except the readers :func:`read_prompt_corpus` and :func:`load_routing_profile`.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scheduler.class_map import default_class_map, domain_rank
from scheduler.emulator.routing import ClassRouting, class_routing
from scheduler.errors import ConfigError, InputError
from scheduler.jsonio import read_json_lines
from scheduler.model_shape import ModelShape
from scheduler.profile import WorkloadProfile, build_profile, load_profile

DEFAULT_CLASS = "general"
MIXTURE = "mixture"
#: The profile shipped with the package, used when the real data is absent.
DEFAULT_PROFILE = Path(__file__).resolve().parent / "data" / "default_profile.json"
ESFT_TRACES = Path("traces") / "esft-deepseek-v2-lite"


def prompt_key(text: str) -> bytes:
    """16-byte digest of a prompt's exact text (the index stores digests, not texts)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


@dataclass(frozen=True)
class PromptIndex:
    """Exact prompt text (by digest) -> corpus domain."""

    domains: dict[bytes, str] = field(default_factory=dict)
    sources: tuple[str, ...] = ()

    def domain_of(self, key: bytes) -> str | None:
        return self.domains.get(key)

    def __len__(self) -> int:
        return len(self.domains)


def prompt_index(pairs: Iterable[tuple[str, str]], sources: tuple[str, ...] = ()) -> PromptIndex:
    """Index (prompt, domain) pairs; a prompt under several domains keeps the first in
    :data:`DOMAINS` order (unknown domains rank last)."""
    domains: dict[bytes, str] = {}
    for text, domain in pairs:
        key = prompt_key(text)
        old = domains.get(key)
        if old is None or domain_rank(domain) < domain_rank(old):
            domains[key] = domain
    return PromptIndex(domains, sources)


def read_prompt_corpus(prompts_dir: Path) -> PromptIndex:
    """Read every ``<prompts_dir>/*/*.jsonl.gz`` (and ``*.jsonl``) of ``{prompt, domain}`` rows."""
    files = sorted(prompts_dir.glob("*/*.jsonl.gz")) + sorted(prompts_dir.glob("*/*.jsonl"))
    if not files:
        raise InputError(prompts_dir, "no */*.jsonl.gz prompt files")

    def rows() -> Iterable[tuple[str, str]]:
        for path in files:
            for n, row in read_json_lines(path):
                if not isinstance(row, dict):
                    raise InputError(path, f"line {n}: expected a JSON object")
                text, domain = row.get("prompt"), row.get("domain")
                if not isinstance(text, str) or not isinstance(domain, str):
                    raise InputError(path, f"line {n}: needs string 'prompt' and 'domain'")
                yield text, domain

    return prompt_index(rows(), tuple(str(p) for p in files))


@dataclass(frozen=True)
class Workload:
    """Request classes: domain lookup, the default, and each class's routing shares."""

    routing: dict[str, ClassRouting]  # profile class -> shares
    weights: dict[str, float]  # profile class -> share of tokens
    domain_to_class: dict[str, str]  # corpus domain -> profile class
    default: str  # a profile class, or MIXTURE
    index: PromptIndex

    def class_of(self, key: bytes | None) -> tuple[str, str]:
        """(profile class, how it was chosen: ``"corpus:<domain>"`` or ``"default"``).

        ``key`` is the prompt's :func:`prompt_key`, or None for a token-id prompt.
        """
        domain = self.index.domain_of(key) if key is not None else None
        if domain is not None and domain in self.domain_to_class:
            return self.domain_to_class[domain], f"corpus:{domain}"
        if self.default != MIXTURE:
            return self.default, "default"
        names = list(self.weights)
        cumulative = np.cumsum([self.weights[n] for n in names])
        u = int.from_bytes((key or b"\0" * 8)[:8], "little") / 2**64 * cumulative[-1]
        pick = min(int(np.searchsorted(cumulative, u, side="right")), len(names) - 1)
        return names[pick], "default"


def build_workload(
    profile: WorkloadProfile,
    index: PromptIndex,
    *,
    default: str = DEFAULT_CLASS,
    class_map: dict[str, str] | None = None,
) -> Workload:
    """Tie a profile to the corpus domains.

    ``class_map`` (domain -> profile class) defaults to ``class_map.default_class_map``:
    the ESFT stand-ins for a profile whose classes are the ESFT domains, else the domains
    that are class names. ``default`` is a domain, a profile class, or ``mixture``.
    """
    classes = list(profile.classes)
    if class_map is None:
        class_map = default_class_map(classes)
    for domain, name in class_map.items():
        if name not in profile.classes:
            raise ConfigError(
                f"--class-map {domain}={name}: the profile has no class {name!r} "
                f"(it has {', '.join(classes)})"
            )
    resolved = class_map.get(default, default)
    if resolved != MIXTURE and resolved not in profile.classes:
        raise ConfigError(
            f"--default-class {default!r} is neither a mapped domain nor a profile class "
            f"(classes: {', '.join(classes)}); use one of them or {MIXTURE!r}"
        )
    return Workload(
        routing={n: class_routing(c) for n, c in profile.classes.items()},
        weights={n: c.weight for n, c in profile.classes.items()},
        domain_to_class=dict(class_map),
        default=resolved,
        index=index,
    )


# --------------------------------------------------------------------------- profiles


def check_profile_model(profile: WorkloadProfile, model: ModelShape, where: str) -> None:
    """The profile's routing shape must be the emulated model's."""
    p = profile.model
    same = (
        p.num_hidden_layers == model.num_hidden_layers
        and p.moe_layer_ids == model.moe_layer_ids
        and p.num_experts == model.num_experts
        and p.top_k == model.top_k
    )
    if not same:
        raise ConfigError(
            f"the routing profile ({where}) is for {p.name} ({p.num_moe_layers} MoE layers, "
            f"{p.num_experts} experts, top-{p.top_k}) but --model {model.name} has "
            f"{model.num_moe_layers} MoE layers, {model.num_experts} experts, "
            f"top-{model.top_k}; pass --profile with a profile built for this model "
            "(moe-scheduler profile TRACES --out P.json)"
        )


def load_routing_profile(profile: Path | None, data: Path | None) -> tuple[WorkloadProfile, str]:
    """The routing profile and a description of where it came from.

    ``profile`` if given; else built now, by label, from the real ESFT traces under
    ``data`` if they are there; else the small profile shipped in the package.
    """
    if profile is not None:
        return load_profile(profile), str(profile)
    if data is not None and (data / ESFT_TRACES).is_dir():
        from scheduler.traces.importers import open_traces

        with tempfile.TemporaryDirectory(prefix="moe-scheduler-emulate-") as tmp:
            traces = open_traces(data / ESFT_TRACES, Path(tmp))
            built = build_profile(traces, by="label")
        return built, f"built by label from {data / ESFT_TRACES}"
    return load_profile(DEFAULT_PROFILE), f"shipped default {DEFAULT_PROFILE.name}"
