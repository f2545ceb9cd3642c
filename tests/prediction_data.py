"""Small generated inputs for the prediction tests (not real data; real-data tests use the
``shared_data`` fixture)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

from scheduler.model_shape import ModelShape

VOCAB = {
    "code": "write python function return list def class loop array string sort implement",
    "math": "compute sum equation solve number total apples integer fraction area triangle",
    "chat": "hello how are you feel friend advice trip movie opinion story weekend",
    "general": "summarize article news classify sentence review label paragraph topic headline",
}
COMMON = ["the", "please", "a", "of", "and", "to", "in", "for", "with", "this"]


def prompts(domain: str, n: int, seed: int = 0) -> list[str]:
    """``n`` generated prompts using ``domain``'s words plus common filler words."""
    rng = np.random.default_rng(seed + len(domain))
    words = VOCAB[domain].split()
    out = []
    for _ in range(n):
        chosen = list(rng.choice(words, 6)) + list(rng.choice(COMMON, 3))
        rng.shuffle(chosen)
        out.append(" ".join(chosen))
    return out


def labelled_prompts(per_domain: int, seed: int = 0) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    for domain in VOCAB:
        texts += prompts(domain, per_domain, seed)
        labels += [domain] * per_domain
    return texts, labels


def write_prompt_dir(root: Path, per_domain: int = 40) -> Path:
    """``root/prompts/<domain>/<domain>_prompts.jsonl.gz`` in the shared prompts' schema."""
    for domain in VOCAB:
        folder = root / "prompts" / domain
        folder.mkdir(parents=True)
        with gzip.open(folder / f"{domain}_prompts.jsonl.gz", "wt", encoding="utf-8") as f:
            for i, text in enumerate(prompts(domain, per_domain)):
                row = {"id": f"{domain}/{i}", "domain": domain, "source": "test", "prompt": text}
                f.write(json.dumps(row) + "\n")
    return root


def clustered_counts(
    model: ModelShape, per_group: int, groups: int = 2, tokens: int = 30, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Counts [n, layers, experts] of ``groups`` groups, each favouring its own experts
    (group g: experts ``g * E / groups ...``); returns (counts, group of each request)."""
    rng = np.random.default_rng(seed)
    e = model.num_experts
    counts, group = [], []
    for g in range(groups):
        p = np.full(e, 0.2)
        p[g * e // groups : (g + 1) * e // groups] = 3.0
        p /= p.sum()
        for _ in range(per_group):
            c = rng.multinomial(tokens * model.top_k, p, size=model.num_moe_layers)
            counts.append(c)
            group.append(g)
    return np.array(counts, dtype=np.float64), np.array(group)


def write_esft_like(directory: Path, model: ModelShape, sequences: int = 12, seed: int = 0) -> Path:
    """``esft_<domain>.npz`` files for two domains whose tokens favour different experts."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    e = model.num_experts
    for d, domain in enumerate(("alpha", "beta")):
        weights = np.full(e, 0.3)
        weights[d * e // 2 : (d + 1) * e // 2] = 3.0
        weights /= weights.sum()
        lengths = rng.integers(8, 16, size=sequences)
        total = int(lengths.sum())
        ids = np.empty((total, model.num_moe_layers, model.top_k), dtype=np.int8)
        for t in range(total):
            for layer in range(model.num_moe_layers):
                ids[t, layer] = rng.choice(e, model.top_k, replace=False, p=weights)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        np.savez(directory / f"esft_{domain}.npz", expert_ids=ids, seq_offsets=offsets)
    return directory
