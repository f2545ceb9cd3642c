"""SGLang versions and what each one's server accepts: pure facts, no imports of SGLang.

One table for everything that depends on the version: the launch flags ``sglang-args``
emits (``scheduler.deploy.sglang_args``) and the request fields the server sends
(``scheduler.server``). The facts were checked against SGLang's own code (argparse of
0.4.10.post2, 0.5.1, 0.5.6-0.5.9, 0.5.22, 0.5.23; the 0.5.23 sources); docs/sglang-versions.md
lists them with their sources.
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
    def parse(cls, text: str) -> SglangVersion:
        match = _VERSION.fullmatch(text.strip())
        if match is None:
            raise ConfigError(
                f"--sglang-version {text!r} is not a version; give SGLang's version as pip "
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


#: From this version on attention DP is ``--attn-dp-size`` (before: ``--enable-dp-attention
#: --dp-size``); sglang-integration.md, "Breaking naming change in 0.5.23".
ATTN_DP_SIZE_SINCE = SglangVersion.parse("0.5.23")
#: ``--enable-return-routed-experts`` first appears in 0.5.7 (sglang-integration.md §3).
ROUTED_EXPERTS_SINCE = SglangVersion.parse("0.5.7")

#: ``routed_dp_rank`` on /generate: 0.5.20 has it (with ``data_parallel_rank`` as a
#: deprecated alias); 0.5.9 and older only know ``data_parallel_rank`` and silently drop
#: an unknown key (``managers/io_struct.py`` of each version). Between the two nothing
#: was checked, so those versions get the old name, which every version accepts.
ROUTED_DP_RANK_SINCE = SglangVersion.parse("0.5.20")
#: The newest version checked; assumed when a backend does not say which it runs.
NEWEST_CHECKED = SglangVersion.parse("0.5.23")


def rank_field(version: SglangVersion | None) -> str:
    """The /generate field that pins a request to a DP rank on ``version`` (None:
    unknown, taken as :data:`NEWEST_CHECKED`)."""
    if version is None or version >= ROUTED_DP_RANK_SINCE:
        return "routed_dp_rank"
    return "data_parallel_rank"
