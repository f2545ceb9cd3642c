"""SGLang versions and what each one's server accepts: pure facts, no imports of SGLang.

One table for everything that depends on the version: the launch flags ``sglang-args``
emits (``scheduler.deploy.sglang_args``) and the request fields the server sends
(``scheduler.server``). The facts were checked against SGLang's own code: the argparse
of every version in :data:`CHECKED_VERSIONS` and their sources. docs/sglang-versions.md
lists them with their sources; tests/data/sglang_argparse/ records each version's
parser for the flags sglang-args emits.

Also here: which of the models we have presets for are served by an SGLang model class
that supports an expert placement at all (:func:`check_expert_location`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from scheduler.errors import ConfigError

_VERSION = re.compile(
    r"v?(?P<release>\d+(?:\.\d+){0,3})"
    r"(?:[-_.]?(?P<pre>a|b|rc)(?P<pre_n>\d+))?"
    r"(?:[-_.]?post(?P<post>\d+))?"
    r"(?:[-_.]?dev(?P<dev>\d+))?"
    r"(?:\+[0-9A-Za-z.]+)?",
)
_PRE_PHASES = ("a", "b", "rc")


@dataclass(frozen=True, order=True)
class SglangVersion:
    """A PEP 440 version (the subset SGLang releases use), ordered as pip orders them.

    ``key`` is what compares: the release padded to four numbers, then the pre-release
    (a pre-release or dev release sorts before its release), then post, then dev. So
    ``0.5.23rc1 < 0.5.23 < 0.5.23.post1``; a pre-release of a version that introduced a
    flag therefore gets the older spelling, which the release still accepts.
    """

    key: tuple[tuple[int, ...], tuple[int, ...], int, tuple[int, int]]
    text: str = field(compare=False)

    @classmethod
    def parse(cls, text: str, what: str = "--sglang-version") -> SglangVersion:
        """``what`` names where the text came from in the error (the option, or the
        config field such as ``[backend] sglang_version``)."""
        match = _VERSION.fullmatch(text.strip())
        if match is None:
            raise ConfigError(
                f"{what} {text!r} is not a version; give SGLang's version as pip "
                "shows it, e.g. 0.5.23, 0.5.5.post3 or 0.5.10rc1"
            )
        release = tuple(int(p) for p in match["release"].split("."))
        release = release + (0,) * (4 - len(release))
        dev = match["dev"]
        if match["pre"] is not None:
            pre: tuple[int, ...] = (0, _PRE_PHASES.index(match["pre"]), int(match["pre_n"]))
        elif dev is not None and match["post"] is None:
            pre = (-1,)  # X.Y.devN comes before X.Y's pre-releases
        else:
            pre = (1,)  # the release itself
        post = -1 if match["post"] is None else int(match["post"])
        dev_key = (1, 0) if dev is None else (0, int(dev))
        return cls((release, pre, post, dev_key), text.strip().removeprefix("v"))

    def __str__(self) -> str:
        return self.text


#: The versions whose argparse and sources the facts below were checked against.
CHECKED_VERSIONS: tuple[SglangVersion, ...] = tuple(
    SglangVersion.parse(v)
    for v in ("0.4.10.post2", "0.5.1", "0.5.6", "0.5.7", "0.5.8", "0.5.9", "0.5.22", "0.5.23")
)
#: The newest version checked; assumed when a backend does not say which it runs.
NEWEST_CHECKED = CHECKED_VERSIONS[-1]

#: From this version on attention DP is ``--attn-dp-size N``
#: (``python/sglang/srt/arg_groups/fields/parallel.py``); before it the only spelling is
#: ``--enable-dp-attention --dp-size N``, which 0.5.22 and 0.5.23 still take, with a
#: deprecation warning. 0.5.9 is the newest checked version without it.
ATTN_DP_SIZE_SINCE = SglangVersion.parse("0.5.22")
#: ``--schedule-policy routing-key`` is an invalid choice (argparse exits) before 0.5.8
#: (the choices list in 0.5.7's ``python/sglang/srt/server_args.py``).
ROUTING_KEY_POLICY_SINCE = SglangVersion.parse("0.5.8")
#: ``--enable-return-routed-experts`` and /generate's ``return_routed_experts`` first
#: appear in 0.5.7 (sgl-project/sglang#12162); 0.5.6's parser has no such flag.
ROUTED_EXPERTS_SINCE = SglangVersion.parse("0.5.7")
#: The OpenAI endpoints (``/v1/chat/completions``, ``/v1/completions``) accept
#: ``return_routed_experts`` and answer a response-level ``sglext.routed_experts`` from
#: 0.5.9 (sgl-project/sglang#17434); 0.5.8 drops the field.
OPENAI_ROUTED_EXPERTS_SINCE = SglangVersion.parse("0.5.9")
#: The OpenAI requests' ``data_parallel_rank``: 0.5.7 has it, 0.5.6 and older do not
#: (``python/sglang/srt/entrypoints/openai/protocol.py``): there a pinned OpenAI request
#: is load-balanced by SGLang, whatever rank the scheduler chose.
OPENAI_DP_RANK_SINCE = SglangVersion.parse("0.5.7")

#: Prefill/decode disaggregation: ``--disaggregation-mode null|prefill|decode``,
#: ``--disaggregation-bootstrap-port`` (default :data:`DEFAULT_BOOTSTRAP_PORT`) and
#: ``--disaggregation-transfer-backend`` (default ``mooncake``) are in the argparse of
#: every version of :data:`CHECKED_VERSIONS`: ``python/sglang/srt/server_args.py`` up to
#: 0.5.9, ``python/sglang/srt/arg_groups/fields/disagg.py`` in 0.5.22 and 0.5.23. Older
#: versions were not checked, so sglang-args does not emit them there.
DISAGGREGATION_SINCE = CHECKED_VERSIONS[0]
#: ``--disaggregation-bootstrap-port``'s default, the same in every checked version.
DEFAULT_BOOTSTRAP_PORT = 8998
#: ``disagg_prefill_dp_rank`` on /generate (a decode request naming the prefill DP rank
#: that holds its KV): 0.5.20, 0.5.22 and 0.5.23 have it
#: (``python/sglang/srt/disaggregation/decode.py:_resolve_prefill_dp_rank``). 0.5.9 and
#: older drop it and take the decode request's own ``data_parallel_rank`` as the prefill
#: DP rank (``prefill_dp_rank=req.data_parallel_rank`` in the same file; 0.4.10.post2:
#: ``target_dp_group = self.data_parallel_rank`` in ``disaggregation/*/conn.py``), so a
#: decode leg pinned to another rank than its prefill leg waits for KV that never comes.
#: Nothing between 0.5.9 and 0.5.20 was checked.
DISAGG_PREFILL_DP_RANK_SINCE = SglangVersion.parse("0.5.20")

#: ``routed_dp_rank`` on /generate: 0.5.20, 0.5.22 and 0.5.23 have it (with
#: ``data_parallel_rank`` as a deprecated alias); 0.5.9 and older only know
#: ``data_parallel_rank`` and silently drop an unknown key
#: (``python/sglang/srt/managers/io_struct.py`` of each version). Between 0.5.9 and 0.5.20
#: nothing was checked, so those versions get the old name, which every version accepts.
ROUTED_DP_RANK_SINCE = SglangVersion.parse("0.5.20")


def rank_field(version: SglangVersion | None) -> str:
    """The /generate field that pins a request to a DP rank on ``version`` (None:
    unknown, taken as :data:`NEWEST_CHECKED`)."""
    if version is None or version >= ROUTED_DP_RANK_SINCE:
        return "routed_dp_rank"
    return "data_parallel_rank"


# ----------------------------------------------------------------------------- models


@dataclass(frozen=True)
class SglangModelClass:
    """The SGLang class that serves a model, and whether it supports expert location.

    ``architecture`` is the Hugging Face ``config.json`` ``architectures[0]``, which
    SGLang's model registry resolves to the class of the same name (its ``EntryClass``);
    ``source`` is that class's file in sgl-project/sglang. ``expert_location``: the class
    defines ``get_model_config_for_expert_location``. Without it
    ``ModelConfigForExpertLocation.from_model_config`` returns None, so SGLang ignores
    ``--init-expert-location`` (``python/sglang/srt/eplb/expert_location.py``), and static
    dispatch then fails ``assert expert_location_metadata is not None`` at the first
    forward pass (``python/sglang/srt/eplb/expert_location_dispatch.py``).
    """

    architecture: str
    source: str
    expert_location: bool


_MODELS = "python/sglang/srt/models/"
_DEEPSEEK_V3 = SglangModelClass("DeepseekV3ForCausalLM", _MODELS + "deepseek_v2.py", True)
_DEEPSEEK_V2 = SglangModelClass("DeepseekV2ForCausalLM", _MODELS + "deepseek_v2.py", True)
_MIXTRAL = SglangModelClass("MixtralForCausalLM", _MODELS + "mixtral.py", False)
_QWEN3_MOE = SglangModelClass("Qwen3MoeForCausalLM", _MODELS + "qwen3_moe.py", True)

#: Model name (``ModelShape.name``: it has no architecture field, so the presets' names
#: and the names our model files use are the keys) -> SGLang class. Checked in the 0.5.23
#: sources: ``deepseek_v2.py`` (``EntryClass = [DeepseekV2ForCausalLM,
#: DeepseekV3ForCausalLM, DeepseekV32ForCausalLM]``; the method is on
#: DeepseekV2ForCausalLM, which the others subclass), ``qwen3_moe.py`` (``EntryClass =
#: Qwen3MoeForCausalLM``, has the method), ``mixtral.py`` (``EntryClass =
#: MixtralForCausalLM``, no method; nor ``mixtral_quant.py``'s QuantMixtralForCausalLM,
#: which serves some quantised Mixtral checkpoints). The same holds in every version of
#: :data:`CHECKED_VERSIONS`.
MODEL_CLASSES: dict[str, SglangModelClass] = {
    "deepseek-v3": _DEEPSEEK_V3,
    "deepseek-v2-lite": _DEEPSEEK_V2,
    "mixtral-8x7b": _MIXTRAL,
    "qwen3-235b-a22b": _QWEN3_MOE,
}
#: Name prefixes whose every checkpoint is served by one class: any Mixtral (8x7B, 8x22B)
#: has ``architectures: ["MixtralForCausalLM"]``; DeepSeek-V2/V2.5/V2-Lite and
#: V3/V3.1/V3.2 are all served by ``deepseek_v2.py``.
_FAMILIES: tuple[tuple[str, SglangModelClass], ...] = (
    ("mixtral", _MIXTRAL),
    ("deepseek-v3", _DEEPSEEK_V3),
    ("deepseek-v2", _DEEPSEEK_V2),
)


def sglang_model_class(model_name: str) -> SglangModelClass | None:
    """The SGLang class serving ``model_name`` (a preset name, a name of that family such
    as ``mixtral-8x22b``, or an HF architecture such as ``MixtralForCausalLM``); None
    when it is not in the table."""
    name = model_name.strip().lower()
    if name in MODEL_CLASSES:
        return MODEL_CLASSES[name]
    for known in MODEL_CLASSES.values():
        if name == known.architecture.lower():
            return known
    for prefix, known in _FAMILIES:
        if name.startswith(prefix):
            return known
    return None


def supports_expert_location(model_name: str) -> bool | None:
    """Whether SGLang honours ``--init-expert-location`` for ``model_name``: True, False,
    or None when its class was not checked."""
    known = sglang_model_class(model_name)
    return None if known is None else known.expert_location


def check_expert_location(model_name: str) -> str | None:
    """Refuse a model whose SGLang class cannot take a placement; warn about one not
    checked.

    Raises :class:`ConfigError` (one line) when the class lacks expert-location support;
    returns a warning for a model not in the table (the caller prints it); None when the
    placement will be used.
    """
    known = sglang_model_class(model_name)
    if known is None:
        return (
            f"model {model_name!r} was not checked for SGLang expert-location support "
            f"(known: {', '.join(MODEL_CLASSES)}): make sure its SGLang model class defines "
            "get_model_config_for_expert_location, or SGLang ignores the placement"
        )
    if not known.expert_location:
        raise ConfigError(
            f"model {model_name!r} is served by SGLang's {known.architecture} "
            f"({known.source}), which has no get_model_config_for_expert_location: SGLang "
            "would ignore --init-expert-location and static dispatch would assert at the "
            "first forward pass; this placement cannot be deployed on SGLang"
        )
    return None
