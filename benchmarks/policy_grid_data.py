"""Workloads of the policy grid (benchmarks/policy_grid.py): real held-out ESFT, and two
SYNTHETIC workloads calibrated on real statistics.

Every workload is *decode replay with held-out predictions*: a request's routed tokens
are split into a prefill part (seen only by the predictors, never replayed) and a decode
part (replayed step by step by the simulator); the policies get the predictions of
:class:`scheduler.simulation.predictions.HeldOutPredictor` fitted on *other* requests.
This is the PD-disaggregated setting, where a decode request's DP rank is chosen after
its prefill ran elsewhere.

* ``esft-heldout`` (REAL): ESFT DeepSeek-V2-Lite traces, 4 domains. Even-numbered
  sequences of each domain fit the placement profile and the predictors; odd-numbered
  ones are replayed. A sequence's first ceil(n/2) tokens are its "prefill", the rest its
  decode steps (the prompt/answer boundary is not recorded: a proxy).
* ``deepseek-v3-synthetic`` (SYNTHETIC, calibrated): DeepSeek-V3 shape; classes are the
  4 SGLang decode workloads of the published EP statistics (their per-layer expert
  shares); each request draws its own expert distribution around its class's
  (Dirichlet, dispersion calibrated on ESFT's per-request spread), and tokens draw top-8
  distinct experts from it (Gumbel-top-k). Separate fit and replay requests.
* ``synthetic-100k`` (SYNTHETIC, calibrated): 100,000 requests of the DeepSeek-V2-Lite
  shape around the ESFT fit half's 4 domain profiles (8 Dirichlet sub-profiles per
  class, same calibrated dispersion), shortened to 2 prefill + 2 decode tokens each.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scheduler.model_shape import PRESETS, ModelShape
from scheduler.profile import ClassProfile, WorkloadProfile
from scheduler.simulation import Workload
from scheduler.simulation.predictions import HeldOutPredictor
from scheduler.traces.store import expert_counts

V3_DECODE_FILES = (
    "decode_in1000out1000",
    "decode_in1800out100",
    "decode_in2000out100",
    "decode_in500out1500",
)


@dataclass
class GridDataset:
    """One dataset of the grid: the placement profile (fit part), a replay workload per
    seed (held-out part, predictions filled in), and what it is."""

    name: str
    synthetic: bool
    note: str
    model: ModelShape
    profile: WorkloadProfile
    workload: Callable[[int], Workload]
    facts: dict[str, Any] = field(default_factory=dict)


def _profile(model: ModelShape, counts: dict[str, np.ndarray], source: str) -> WorkloadProfile:
    """A placement profile from per-class [layers, experts] counts (weights: token shares)."""
    total = sum(float(c.sum()) for c in counts.values())
    classes = {
        name: ClassProfile(weight=float(c.sum()) / total, counts={"decode": c.astype(np.float64)})
        for name, c in sorted(counts.items())
    }
    return WorkloadProfile(model, classes, {"source": source})


def _workload(
    ids: list[np.ndarray],
    request_ids: list[str],
    classes: list[str],
    histograms: Sequence[np.ndarray | None],
    prefill_ids: list[np.ndarray] | None = None,
    split_phase: int = 0,
) -> Workload:
    """Decode-only replay: ``ids`` per request [tokens, layers, top_k]; the labels and
    histograms are the *predicted* ones. With ``prefill_ids`` (per request, same shape)
    each request's prefill tokens are packed before its decode tokens (two-phase
    replay, e.g. the production-size prefill replay); ``split_phase``: how many of them
    were one recorded phase split in two."""
    decode = np.array([len(x) for x in ids], dtype=np.int64)
    prefill = np.zeros(len(ids), dtype=np.int64)
    packed = ids
    if prefill_ids is not None:
        prefill = np.array([len(x) for x in prefill_ids], dtype=np.int64)
        packed = [x for pair in zip(prefill_ids, ids, strict=True) for x in pair]
    hist = np.empty(len(ids), dtype=object)
    hist[:] = histograms
    return Workload(
        request_ids=request_ids,
        labels=list(classes),
        token_ids=np.concatenate(packed).astype(np.int16),
        offset=np.concatenate([[0], np.cumsum(prefill + decode)])[:-1],
        prefill=prefill,
        decode=decode,
        arrival_s=np.full(len(ids), np.nan),
        histogram=hist,
        split_phase=split_phase,
    )


def dispersion(first: np.ndarray, second: np.ndarray, labels: list[str]) -> tuple[float, float]:
    """Dirichlet concentration ``alpha`` of requests around their class's per-layer
    shares, by the method of moments on two halves of each real request
    (``first`` / ``second [n, layers, experts]`` counts): the sampling noise of the two
    halves is independent, so ``E sum_e (a_e - p_e)(b_e - p_e) = (1 - sum_e p_e^2) /
    (alpha + 1)`` for the halves' shares a, b around the class mean p. Returns (alpha,
    the raw estimate of 1 / (alpha + 1)); alpha is capped at 999 when the estimate is
    <= 0.001 (no per-request spread beyond the class detectable)."""
    a = first / np.maximum(first.sum(axis=2, keepdims=True), 1)
    b = second / np.maximum(second.sum(axis=2, keepdims=True), 1)
    labels_arr = np.array(labels)
    ratios = []
    for c in sorted(set(labels)):
        rows = labels_arr == c
        p = (a[rows].mean(axis=0) + b[rows].mean(axis=0)) / 2  # [layers, experts]
        cross = ((a[rows] - p) * (b[rows] - p)).sum(axis=2)  # [n_c, layers]
        ratios.append(cross / (1.0 - (p**2).sum(axis=1)))
    raw = float(np.mean(np.concatenate(ratios)))
    inv = min(max(raw, 1e-3), 1.0)
    return 1.0 / inv - 1.0, raw


def sample_tokens(q: np.ndarray, tokens: int, top_k: int, rng: np.random.Generator) -> np.ndarray:
    """``tokens`` tokens per row of ``q [m, layers, experts]`` (per-layer distributions),
    each drawing ``top_k`` distinct experts proportionally to q (Gumbel-top-k: the k
    smallest Exp(1) / q). Returns [m, tokens, layers, top_k] int16. Drawn in blocks of
    rows of at most ~64M keys (the same draws as in one block: the generator's stream
    does not depend on how it is split)."""
    m, layers, experts = q.shape
    out = np.empty((m, tokens, layers, top_k), dtype=np.int16)
    block = max(1, (1 << 26) // max(tokens * layers * experts, 1))
    for start in range(0, m, block):
        stop = min(m, start + block)
        keys = rng.standard_exponential(
            size=(stop - start, tokens, layers, experts), dtype=np.float32
        )
        with np.errstate(divide="ignore"):
            keys /= q[start:stop, None].astype(np.float32)
        flat = keys.reshape(-1, experts)
        part = out[start:stop].reshape(-1, top_k)
        rows = np.arange(flat.shape[0])
        for j in range(top_k):
            pick = flat.argmin(axis=1)
            part[:, j] = pick
            flat[rows, pick] = np.inf
    return out


def _dirichlet(p: np.ndarray, alpha: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` draws of per-layer Dirichlet(alpha x p) around ``p [layers, experts]``."""
    g = rng.gamma(np.maximum(alpha * p, 1e-3), size=(size, *p.shape))
    return g / g.sum(axis=2, keepdims=True)


def _counts(ids: np.ndarray, experts: int) -> np.ndarray:
    """[m, tokens, layers, k] ids -> [m, layers, experts] counts."""
    m, _, layers, _ = ids.shape
    cell = (
        np.arange(m)[:, None, None, None] * layers + np.arange(layers)[None, None, :, None]
    ) * experts + ids
    return np.bincount(cell.ravel(), minlength=m * layers * experts).reshape(m, layers, experts)


# ----------------------------------------------------------------------------- ESFT


def load_esft(data: Path) -> dict[str, Any]:
    """ESFT sequences split even (fit) / odd (held out), each in prefill / decode halves."""
    from scheduler.traces.importers import esft

    source = esft.read(data / "traces" / "esft-deepseek-v2-lite", None)
    model = source.model
    halves: dict[str, dict[str, list[Any]]] = {
        h: {"ids": [], "label": [], "rid": [], "full": []} for h in ("fit", "test")
    }
    for record in source.records:
        ids = np.concatenate([v for v in record.token_ids.values() if len(v)])
        half = "fit" if int(record.request_id.rsplit("/", 1)[1]) % 2 == 0 else "test"
        halves[half]["ids"].append(ids)
        halves[half]["label"].append(str(record.label))
        halves[half]["rid"].append(record.request_id)
    return {"model": model, **halves}


def _split(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cut = (len(ids) + 1) // 2
    return ids[:cut], ids[cut:]


def esft_dataset(
    esft: dict[str, Any], max_decode: int | None = None, *, two_phase: bool = False
) -> tuple[GridDataset, float]:
    """The real held-out ESFT dataset, and the dispersion calibrated on its fit half.

    ``max_decode``: replay at most the first that many decode tokens of each request
    (the longest ESFT sequences would otherwise set the simulated time alone).
    ``two_phase``: the workload also carries each replayed sequence's first half as its
    prefill tokens (for a prefill replay; the predictions are the same)."""
    model: ModelShape = esft["model"]
    e = model.num_experts
    fit, test = esft["fit"], esft["test"]
    fit_pre = np.stack([expert_counts(_split(x)[0], e) for x in fit["ids"]])
    fit_dec = np.stack([expert_counts(_split(x)[1], e) for x in fit["ids"]])
    predictor = HeldOutPredictor("ridge").fit(fit_pre, fit["label"], fit_dec)
    test_pre = np.stack([expert_counts(_split(x)[0], e) for x in test["ids"]])
    decode_ids = [_split(x)[1][:max_decode] for x in test["ids"]]
    classes = predictor.predict_classes(test_pre)
    pairs = np.array([len(d) * model.top_k for d in decode_ids], dtype=np.float64)
    hists = predictor.predict_histograms(test_pre, pairs)
    prefill_ids = [_split(x)[0] for x in test["ids"]] if two_phase else None
    work = _workload(
        decode_ids,
        list(test["rid"]),
        classes,
        list(hists),
        prefill_ids,
        len(decode_ids) if two_phase else 0,
    )
    accuracy = float(np.mean([a == b for a, b in zip(classes, test["label"], strict=True)]))
    full: dict[str, np.ndarray] = {}
    for ids, label in zip(fit["ids"], fit["label"], strict=True):
        full[label] = full.get(label, 0) + expert_counts(ids, e)
    alpha, raw = dispersion(fit_pre, fit_dec, fit["label"])
    dataset = GridDataset(
        name="esft-heldout",
        synthetic=False,
        note="REAL ESFT routing (DeepSeek-V2-Lite); fit: even sequences, replayed: odd "
        "sequences' second halves (at most the first "
        f"{max_decode or 'all'} tokens of each); predictions from their first halves",
        model=model,
        profile=_profile(model, full, "ESFT even sequences"),
        workload=lambda seed: work,
        facts={
            "fit_requests": len(fit["ids"]),
            "replayed_requests": len(decode_ids),
            "replayed_tokens": int(sum(len(d) for d in decode_ids)),
            "heldout_class_accuracy": accuracy,
            "histogram_predictor": "ridge (prefill -> decode shares, per layer)",
            "decode_tokens_capped_at": max_decode,
            "dispersion_raw_estimate": raw,
            "dirichlet_alpha": alpha,
        },
    )
    return dataset, alpha


# ----------------------------------------------------------------------- synthetic


def _synthetic(
    name: str,
    note: str,
    model: ModelShape,
    class_shares: dict[str, np.ndarray],
    alpha: float,
    requests: int,
    fit_requests: int,
    prefill_tokens: int,
    decode_tokens: int,
    sub_profiles: int | None,
    histogram: str,
    two_phase: bool = False,
) -> GridDataset:
    """A calibrated synthetic dataset (see the module docstring)."""
    names = sorted(class_shares)
    e, k = model.num_experts, model.top_k

    def draw(
        n: int, rng: np.random.Generator, subs: dict[str, np.ndarray] | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cls = rng.integers(0, len(names), n)
        if subs is None:
            q = np.stack([_dirichlet(class_shares[names[c]], alpha, 1, rng)[0] for c in cls])
        else:
            pick = rng.integers(0, sub_profiles or 1, n)
            q = np.stack([subs[names[c]][s] for c, s in zip(cls, pick, strict=True)])
        pre = sample_tokens(q, prefill_tokens, k, rng)
        dec = sample_tokens(q, decode_tokens, k, rng)
        return cls, pre, dec

    # the fit requests and the sub-profiles come from seed 0's stream; replay seeds differ
    rng0 = np.random.default_rng(12345)
    subs = None
    if sub_profiles:
        subs = {c: _dirichlet(class_shares[c], alpha, sub_profiles, rng0) for c in names}
    cls, pre, dec = draw(fit_requests, rng0, subs)
    fit_labels = [names[c] for c in cls]
    predictor = HeldOutPredictor(histogram).fit(_counts(pre, e), fit_labels, _counts(dec, e))
    fit_counts = {c: _counts(dec, e)[np.array(fit_labels) == c].sum(axis=0) for c in names}
    cache: dict[int, Workload] = {}
    facts: dict[str, Any] = {
        "fit_requests": fit_requests,
        "replayed_requests": requests,
        "prefill_tokens": prefill_tokens,
        "decode_tokens": decode_tokens,
        "dirichlet_alpha": alpha,
        "sub_profiles_per_class": sub_profiles,
        "histogram_predictor": histogram,
        "prefill_replayed": two_phase,
    }

    def workload(seed: int) -> Workload:
        if seed in cache:
            return cache[seed]
        rng = np.random.default_rng(1000 + seed)
        ids, pres, rids, classes, hists, hits = [], [], [], [], [], 0
        chunk = 2000
        for start in range(0, requests, chunk):
            n = min(chunk, requests - start)
            c, p, d = draw(n, rng, subs)
            counts = _counts(p, e)
            predicted = predictor.predict_classes(counts)
            pairs = np.full(n, float(decode_tokens * k))
            hists += predictor.predict_histograms(counts, pairs, predicted)
            classes += predicted
            hits += sum(a == names[b] for a, b in zip(predicted, c, strict=True))
            ids += list(d)
            pres += list(p) if two_phase else []
            rids += [f"s{seed}/{start + i}" for i in range(n)]
        facts[f"heldout_class_accuracy_seed{seed}"] = hits / requests
        cache.clear()  # keep one seed in memory
        cache[seed] = _workload(ids, rids, classes, hists, pres if two_phase else None)
        return cache[seed]

    return GridDataset(
        name, True, note, model, _profile(model, fit_counts, "synthetic fit"), workload, facts
    )


def v3_class_shares(data: Path) -> dict[str, np.ndarray]:
    """Per-layer expert shares of SGLang's DeepSeek-V3 decode statistics (MoE layers)."""
    model = PRESETS["deepseek-v3"]
    out = {}
    for stem in V3_DECODE_FILES:
        path = data / "traces" / "sglang-deepseek-v3-eplb-stats" / f"{stem}.json"
        counts = np.array(json.loads(path.read_text(encoding="utf-8"))["logical_count"])
        counts = counts[list(model.moe_layer_ids)]
        out[stem] = counts / counts.sum(axis=1, keepdims=True)
    return out


def v3_dataset(
    data: Path,
    alpha: float,
    requests: int,
    decode_tokens: int,
    prefill_tokens: int = 16,
    *,
    two_phase: bool = False,
) -> GridDataset:
    """``two_phase``: the workload also carries the requests' ``prefill_tokens`` prompt
    tokens (for a prefill replay)."""
    return _synthetic(
        "deepseek-v3-synthetic",
        "SYNTHETIC per-request DeepSeek-V3 workload calibrated on SGLang's published decode "
        "statistics (4 workloads = classes); per-request dispersion calibrated on ESFT",
        PRESETS["deepseek-v3"],
        v3_class_shares(data),
        alpha,
        requests=requests,
        fit_requests=max(64, requests // 2),
        prefill_tokens=prefill_tokens,
        decode_tokens=decode_tokens,
        sub_profiles=None,
        histogram="ridge",
        two_phase=two_phase,
    )


def synthetic_100k(esft: dict[str, Any], alpha: float, requests: int) -> GridDataset:
    model: ModelShape = esft["model"]
    e = model.num_experts
    shares: dict[str, np.ndarray] = {}
    for ids, label in zip(esft["fit"]["ids"], esft["fit"]["label"], strict=True):
        shares[label] = shares.get(label, 0) + expert_counts(ids, e)
    shares = {c: s / s.sum(axis=1, keepdims=True) for c, s in shares.items()}
    return _synthetic(
        "synthetic-100k",
        f"SYNTHETIC {requests:,} requests, DeepSeek-V2-Lite shape, around the ESFT fit "
        "half's 4 domain profiles; shortened to 2 prefill + 2 decode tokens per request",
        model,
        shares,
        alpha,
        requests=requests,
        fit_requests=2000,
        prefill_tokens=2,
        decode_tokens=2,
        sub_profiles=8,
        histogram="class",
    )
