"""Reading the predictors' training data: labelled prompts and per-request routing.

Prompts: ``<dir>/<domain>/*.jsonl[.gz|.xz]`` rows with ``prompt`` and ``domain`` (the
shared prompts' schema, ``../shared/data/prompts``); :data:`SOURCE_RELABELS` lists the
source datasets whose published domain disagrees with their text. Routing: any
:class:`~scheduler.traces.store.TraceSet`, read into per-request arrays.
File I/O only; no network code.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scheduler.class_map import domain_rank
from scheduler.errors import InputError
from scheduler.jsonio import read_json_lines
from scheduler.progress import Progress
from scheduler.traces.store import PHASES, TraceSet, expert_counts

#: Source dataset -> the domain its prompts are labelled with instead of their folder's.
#: AlpacaEval's ``helpful_base`` (Anthropic HH), ``koala``, ``oasst`` (OpenAssistant) and
#: ``vicuna`` (Vicuna-Bench) parts are first user turns of chat-assistant conversations,
#: published in the ``general`` folder. In ../shared/data, 73 of them appear verbatim in
#: the chat folder, labelled chat there (56 Vicuna-Bench and 1 MT-Bench question in the
#: ``vicuna`` part, 15 ShareGPT prompts in ``koala``, 1 in ``oasst``). AlpacaEval's
#: ``selfinstruct`` part (self-instruct's expert-written task instructions) stays
#: ``general``, like the self-instruct seed tasks. Evidence: docs/predictors.md.
SOURCE_RELABELS: dict[str, str] = {
    "alpaca_eval:helpful_base": "chat",
    "alpaca_eval:koala": "chat",
    "alpaca_eval:oasst": "chat",
    "alpaca_eval:vicuna": "chat",
}


@dataclass(frozen=True)
class PromptSet:
    """Labelled prompts. All arrays are [n] str (``ids`` any).

    ``domains`` are the labels to train and score on; ``published_domains`` the rows'
    ``domain`` field as read (the two differ only after :func:`relabel_sources`).
    """

    ids: np.ndarray
    texts: np.ndarray
    domains: np.ndarray
    sources: np.ndarray
    published_domains: np.ndarray
    files: tuple[Path, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, rows: np.ndarray) -> PromptSet:
        return PromptSet(
            self.ids[rows],
            self.texts[rows],
            self.domains[rows],
            self.sources[rows],
            self.published_domains[rows],
            self.files,
        )

    @property
    def relabelled(self) -> np.ndarray:
        """[n] bool: rows whose label differs from the published one."""
        return self.domains != self.published_domains


def relabel_sources(prompts: PromptSet, rules: Mapping[str, str]) -> PromptSet:
    """``prompts`` with every row of a source in ``rules`` labelled ``rules[source]``;
    ``published_domains`` keep the files' labels. Rows are neither added nor removed."""
    domains = prompts.domains.copy()
    for source, domain in rules.items():
        domains[prompts.sources == source] = domain
    return PromptSet(
        prompts.ids,
        prompts.texts,
        domains,
        prompts.sources,
        prompts.published_domains,
        prompts.files,
    )


def prompt_files(directory: Path) -> list[Path]:
    """The JSON-lines prompt files under ``directory`` (one folder per domain)."""
    if not directory.is_dir():
        raise InputError(directory, "prompt directory does not exist")
    files = sorted(p for p in directory.rglob("*.jsonl*") if p.is_file())
    if not files:
        raise InputError(directory, "no *.jsonl[.gz|.xz] prompt files found")
    return files


def load_prompts(directory: Path, progress: Progress | None = None) -> PromptSet:
    """Every row with a non-empty ``prompt`` and a ``domain``; exact duplicates of
    (prompt, domain) are kept once, and a prompt listed under several domains keeps only
    its row of the first (``class_map.domain_rank``, the emulator's rule): the same text
    cannot be both. Rows missing either field are an InputError."""
    ids, texts, domains, sources = [], [], [], []
    seen: set[tuple[str, str]] = set()
    files = prompt_files(directory)
    for path in files:
        for n, row in read_json_lines(path):
            if not isinstance(row, dict):
                raise InputError(path, f"line {n}: expected a JSON object")
            prompt, domain = row.get("prompt"), row.get("domain")
            if not isinstance(prompt, str) or not isinstance(domain, str) or not domain:
                raise InputError(path, f"line {n}: needs string fields 'prompt' and 'domain'")
            if not prompt.strip() or (prompt, domain) in seen:
                continue
            seen.add((prompt, domain))
            ids.append(str(row.get("id", f"{path.name}:{n}")))
            texts.append(prompt)
            domains.append(domain)
            sources.append(str(row.get("source", "")))
        if progress:
            progress(f"prompts: read {len(texts)} rows ({path.name})")
    if len(set(domains)) < 2:
        raise InputError(directory, f"need prompts of at least two domains, found {set(domains)}")
    first: dict[str, str] = {}
    for text, domain in zip(texts, domains, strict=True):
        if text not in first or domain_rank(domain) < domain_rank(first[text]):
            first[text] = domain
    keep = np.array([first[t] == d for t, d in zip(texts, domains, strict=True)])
    labels = np.array(domains, dtype=object)[keep]
    return PromptSet(
        np.array(ids, dtype=object)[keep],
        np.array(texts, dtype=object)[keep],
        labels,
        np.array(sources, dtype=object)[keep],
        labels.copy(),
        tuple(files),
    )


def grouped_split(
    labels: np.ndarray, groups: np.ndarray, test_fraction: float, random_state: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows): stratified by label, rows of one group on one side.

    Uses scikit-learn's StratifiedGroupKFold with ``round(1 / test_fraction)`` folds and
    takes the first fold as the test set.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    folds = max(2, round(1 / test_fraction))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=random_state)
    train, test = next(splitter.split(np.zeros(len(labels)), labels, groups))
    return train, test


def text_groups(texts: np.ndarray) -> np.ndarray:
    """[n] int group ids: identical texts share a group (so a split never straddles them)."""
    index: dict[str, int] = {}
    return np.array([index.setdefault(t, len(index)) for t in texts], dtype=np.int64)


@dataclass(frozen=True)
class RoutingSet:
    """Per-request routing read from a trace store.

    counts: [n, layers, experts] float64, the phase a profile would use (decode, else
    prefill, else mixed); phase_counts: phase -> [n, layers, experts] (zeros where the
    phase is absent), present: phase -> [n] bool and tokens: phase -> [n] int64;
    token_ids: per request, phase -> [tokens, layers, top_k] (empty when the store has
    no token ids).
    """

    ids: list[str]
    labels: list[str | None]
    prompts: list[str | None]
    counts: np.ndarray
    phase_counts: dict[str, np.ndarray]
    present: dict[str, np.ndarray]
    tokens: dict[str, np.ndarray]
    token_ids: list[dict[str, np.ndarray]]

    def __len__(self) -> int:
        return len(self.ids)


def load_routing(traces: TraceSet, *, keep_token_ids: bool = True) -> RoutingSet:
    """Read every request of a trace store into memory (fine for the real datasets: the
    largest per-request one, ESFT, is 213 requests)."""
    ids: list[str] = []
    labels: list[str | None] = []
    prompts: list[str | None] = []
    shape = (traces.model.num_moe_layers, traces.model.num_experts)
    per_phase: dict[str, list[np.ndarray]] = {p: [] for p in PHASES}
    tokens: dict[str, list[int]] = {p: [] for p in PHASES}
    present: dict[str, list[bool]] = {p: [] for p in PHASES}
    token_ids: list[dict[str, np.ndarray]] = []
    for record in traces.records():
        ids.append(record.request_id)
        labels.append(record.label)
        prompts.append(record.prompt)
        for phase in PHASES:
            have = phase in record.counts
            present[phase].append(have)
            per_phase[phase].append(record.counts[phase] if have else np.zeros(shape, np.int64))
            tokens[phase].append(record.tokens.get(phase, 0))
        token_ids.append(record.token_ids if keep_token_ids else {})
    if not ids:
        raise InputError(traces.path, "no requests")
    phase_counts = {p: np.stack(per_phase[p]).astype(np.float64) for p in PHASES if any(present[p])}
    phase_present = {p: np.array(present[p]) for p in phase_counts}
    counts = np.zeros((len(ids), *shape))
    chosen = np.zeros(len(ids), dtype=bool)
    for phase in ("decode", "prefill", "mixed"):
        if phase in phase_counts:
            take = phase_present[phase] & ~chosen
            counts[take] = phase_counts[phase][take]
            chosen |= take
    phase_tokens = {p: np.array(tokens[p], dtype=np.int64) for p in phase_counts}
    return RoutingSet(
        ids, labels, prompts, counts, phase_counts, phase_present, phase_tokens, token_ids
    )


def split_tokens(
    token_ids: Iterable[np.ndarray], num_experts: int, fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """The ESFT proxy of prefill / decode: each sequence's first ``fraction`` of tokens
    (at least one) against the rest (at least one).

    token_ids: per request [tokens, layers, top_k]. Returns (early, late) counts, each
    [n, layers, experts] float64.
    """
    early, late = [], []
    for ids in token_ids:
        if len(ids) < 2:
            raise ValueError("every sequence needs at least two tokens to split")
        cut = min(max(1, round(fraction * len(ids))), len(ids) - 1)
        early.append(expert_counts(ids[:cut], num_experts))
        late.append(expert_counts(ids[cut:], num_experts))
    return np.stack(early).astype(np.float64), np.stack(late).astype(np.float64)


def file_fingerprint(paths: Iterable[Path], root: Path | None = None) -> dict[str, object]:
    """sha256 of each file (and of the list), to record what a bundle was trained on."""
    entries = []
    digest = hashlib.sha256()
    for path in sorted(paths):
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError as e:
            raise InputError(path, f"cannot read ({e.strerror or e})") from None
        name = str(path.relative_to(root)) if root and path.is_relative_to(root) else str(path)
        entries.append({"file": name, "bytes": path.stat().st_size, "sha256": h.hexdigest()})
        digest.update(f"{name}\0{h.hexdigest()}\n".encode())
    return {"sha256": digest.hexdigest(), "files": entries}
