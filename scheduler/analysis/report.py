"""Render :class:`DatasetStats` into a Markdown report with PNG figures (matplotlib, Agg).

:func:`write_report` writes ``<out>.md`` and ``<out-stem>-figures/`` atomically: both are
built in temporary locations and moved into place only when complete.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from scheduler import __version__
from scheduler.analysis import stats
from scheduler.analysis.collect import DatasetStats

TOP_FRACTION = 0.1


def _fmt(x: float | np.floating, digits: int = 2) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _finite(values: np.ndarray) -> np.ndarray:
    """The finite entries of ``values``, flattened."""
    values = np.asarray(values, dtype=np.float64).ravel()
    return values[np.isfinite(values)]


def _mean(values: np.ndarray) -> float:
    """Mean of the finite entries; nan (printed n/a) when there are none."""
    return float(stats.finite_mean(values))


def _min(values: np.ndarray) -> float:
    finite = _finite(values)
    return float(finite.min()) if finite.size else np.nan


def _max(values: np.ndarray) -> float:
    finite = _finite(values)
    return float(finite.max()) if finite.size else np.nan


def _argmax(values: np.ndarray) -> int | None:
    """Index of the largest finite entry of a 1-D array; None when none is finite."""
    values = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(values)
    return int(np.argmax(np.where(ok, values, -np.inf))) if ok.any() else None


def _argmin(values: np.ndarray) -> int | None:
    values = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(values)
    return int(np.argmin(np.where(ok, values, np.inf))) if ok.any() else None


def _layer_list(ds: DatasetStats, mask: np.ndarray) -> str:
    """'model layer 3' / 'model layers 3, 5, ...' for the MoE layer indices set in ``mask``."""
    ids = [str(ds.model.moe_layer_ids[i]) for i in np.flatnonzero(mask)]
    shown = ", ".join(ids[:12]) + (f", ... ({len(ids)} in all)" if len(ids) > 12 else "")
    return f"model layer{'s' if len(ids) > 1 else ''} {shown}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]


class _Figures:
    """Saves figures into a directory and returns Markdown image links relative to the report."""

    def __init__(self, directory: Path, link_prefix: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        self.directory = directory
        self.link_prefix = link_prefix

    def save(self, fig: object, name: str, alt: str) -> str:
        import matplotlib.pyplot as plt

        fig.savefig(self.directory / name, dpi=90)  # type: ignore[attr-defined]
        plt.close(fig)  # type: ignore[arg-type]
        return f"![{alt}]({self.link_prefix}/{name})"


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name).strip("-")


def _heatmaps(ds: DatasetStats, figs: _Figures, phase: str) -> str:
    import matplotlib.pyplot as plt

    classes = [c for c in sorted(ds.class_counts) if phase in ds.class_counts[c]]
    cols = min(4, len(classes))
    rows = -(-len(classes) // cols)
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(3.8 * cols + 1, 3.0 * rows + 0.6),
        squeeze=False,
        layout="constrained",
    )
    image = None
    for ax, name in zip(axes.ravel(), classes, strict=False):
        counts = ds.class_counts[name][phase]
        mean = counts.mean(axis=1, keepdims=True)
        rel = np.divide(counts, mean, out=np.zeros_like(counts), where=mean > 0)
        image = ax.imshow(
            np.log2(np.maximum(rel, 1 / 16)),
            aspect="auto",
            cmap="RdBu_r",
            vmin=-4,
            vmax=4,
            interpolation="nearest",
        )
        ax.set_title(f"{name} ({phase})", fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
        if ax in axes[:, 0]:
            ax.set_ylabel("MoE layer index", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(classes) :]:
        ax.axis("off")
    if image is not None:
        bar = fig.colorbar(image, ax=axes, shrink=0.8)
        bar.set_label("log2(load / layer mean)", fontsize=8)
    fig.suptitle(f"{ds.name}: expert load per class, {phase}", fontsize=10)
    return figs.save(fig, f"{_slug(ds.name)}-heatmap-{phase}.png", f"{ds.name} {phase} heatmap")


def _line_plot(
    ds: DatasetStats,
    figs: _Figures,
    name: str,
    title: str,
    ylabel: str,
    series: dict[str, np.ndarray],
) -> str:
    import matplotlib.pyplot as plt

    series = {k: v for k, v in series.items() if _finite(v).size}
    if not series:
        return f"(No figure of {title}: every value is n/a.)"
    fig, ax = plt.subplots(figsize=(7, 3.2), layout="constrained")
    for label, values in series.items():
        ax.plot(np.arange(len(values)), values, marker=".", linewidth=1, label=label)
    ax.set_xlabel("MoE layer index")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ds.name}: {title}", fontsize=10)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=7, ncol=2)
    return figs.save(fig, f"{_slug(ds.name)}-{name}.png", f"{ds.name} {title}")


def _section_model(ds: DatasetStats) -> list[str]:
    m = ds.model
    lines = [
        f"## {ds.name}",
        "",
        f"- input: {ds.kind}"
        + (f", `{ds.source['path']}`" if "path" in ds.source else "")
        + (f" ({ds.source['importer']} importer)" if "importer" in ds.source else ""),
        f"- model: {m.name} ({m.num_hidden_layers} layers, {m.num_moe_layers} MoE, "
        f"{m.num_experts} experts, top-{m.top_k}, hidden {m.hidden_size})",
        f"- records: {ds.num_requests} ({ds.granularity}); phases: {', '.join(ds.phases)}",
        f"- classes: {len(ds.class_counts)}",
        "",
    ]
    if "note" in ds.source:
        lines[-1:-1] = [f"- note: {ds.source['note']}"]
    rows = [
        [name, str(ds.class_requests.get(name, 0)), _fmt(ds.class_weights.get(name, np.nan), 3)]
        for name in sorted(ds.class_counts)
    ]
    return lines + _table(["class", "records", "token share"], rows)


def _section_imbalance(ds: DatasetStats, figs: _Figures) -> list[str]:
    lines = ["### Load imbalance (max / mean expert load per layer)", ""]
    rows, series = [], {}
    for phase in ds.phases:
        entries = [("all classes", ds.total_counts(phase))] + [
            (n, c[phase]) for n, c in sorted(ds.class_counts.items()) if phase in c
        ]
        if len(entries) == 2:  # a single class is the same as "all"
            entries = entries[:1]
        for name, counts in entries:
            imb = stats.load_imbalance(counts)  # nan for a layer without load
            worst = _argmax(imb)
            rows.append(
                [
                    name,
                    phase,
                    _fmt(_mean(imb)),
                    "n/a" if worst is None else _fmt(imb[worst]),
                    "n/a (no load)" if worst is None else str(ds.model.moe_layer_ids[worst]),
                ]
            )
            if name == "all classes":
                series[phase] = imb
    lines += _table(["class", "phase", "mean over layers", "worst layer", "worst layer id"], rows)
    for phase in ds.phases:
        empty = ds.total_counts(phase).sum(axis=1) <= 0
        if empty.any():
            lines += [
                f"No {phase} load recorded in {_layer_list(ds, empty)}: left out of the "
                "imbalance (undefined there).",
                "",
            ]
    lines += [
        _line_plot(
            ds, figs, "imbalance", "load imbalance per layer (all classes)", "max / mean", series
        ),
        "",
    ]
    lines += ["Hottest experts (all classes; load relative to the layer mean):", ""]
    hot_rows = []
    for phase in ds.phases:
        for layer, expert, rel in stats.hottest_experts(ds.total_counts(phase), 5):
            hot_rows.append([phase, str(ds.model.moe_layer_ids[layer]), str(expert), _fmt(rel)])
    if hot_rows:
        lines += _table(["phase", "model layer", "expert", "load / mean"], hot_rows)
    else:
        lines += ["None: no expert has any load.", ""]
    lines += [
        "Expert load heatmaps (layers x experts, per class; red = hotter than the layer mean):",
        "",
    ]
    lines += [_heatmaps(ds, figs, phase) for phase in ds.phases]
    return lines + [""]


def _section_specificity(ds: DatasetStats, figs: _Figures) -> list[str]:
    lines = ["### Domain specificity", ""]
    placement = ds.class_placement_counts()
    if len(placement) < 2:
        return lines + ["Only one class: nothing to compare.", ""]
    pairs = stats.pairwise_js(placement)  # nan where a class has no load in a layer
    js_mean = stats.finite_mean(np.stack(list(pairs.values())), axis=0)

    def layer(i: int | None) -> str:
        return "n/a" if i is None else str(ds.model.moe_layer_ids[i])

    lines += [
        "Jensen-Shannon divergence (bits, 0 = identical, 1 = disjoint) between the classes' "
        "per-layer expert distributions (decode counts where present, else prefill):",
        "",
        f"- mean over layers and class pairs: **{_fmt(_mean(js_mean), 3)}**; "
        f"most specific layer: {layer(_argmax(js_mean))} ({_fmt(_max(js_mean), 3)}); "
        f"least: {layer(_argmin(js_mean))} ({_fmt(_min(js_mean), 3)})",
        "",
    ]
    lines += _table(
        ["class pair", "mean JS over layers", "max JS (layer)"],
        [
            [
                f"{a} / {b}",
                _fmt(_mean(v), 3),
                f"{_fmt(_max(v), 3)} ({layer(_argmax(v))})",
            ]
            for (a, b), v in sorted(pairs.items())
        ],
    )
    undefined = np.any([~np.isfinite(v) for v in pairs.values()], axis=0)
    if undefined.any():
        lines += [
            f"In {_layer_list(ds, undefined)} a class has no load: nothing to compare, so "
            "the JS divergence of those pairs is undefined there and left out.",
            "",
        ]
    series = {"mean pairwise JS (bits)": js_mean}
    if ds.accuracy is not None:
        series["class-from-activation accuracy"] = ds.accuracy
        lines += [
            f"Predicting a request's class from one layer's expert counts (multinomial "
            f"logistic regression, stratified 80/20 split by request, mean of 5 splits, "
            f"{ds.accuracy_requests} requests): mean accuracy over layers "
            f"**{_fmt(float(ds.accuracy.mean()) * 100, 1)}%** "
            f"(± {_fmt(float(ds.accuracy.std()) * 100, 1)} across layers; best layer "
            f"{ds.model.moe_layer_ids[int(np.argmax(ds.accuracy))]} "
            f"{_fmt(float(ds.accuracy.max()) * 100, 1)}%, worst layer "
            f"{ds.model.moe_layer_ids[int(np.argmin(ds.accuracy))]} "
            f"{_fmt(float(ds.accuracy.min()) * 100, 1)}%; chance "
            f"{_fmt(100 / len(placement), 1)}%).",
            "",
        ]
    else:
        lines += [f"Class-from-activation accuracy: not measured ({ds.notes.get('accuracy')}).", ""]
    lines += [
        _line_plot(ds, figs, "specificity", "domain specificity per layer", "value", series),
        "",
    ]
    return lines


def _section_prefill_decode(ds: DatasetStats, figs: _Figures) -> list[str]:
    lines = ["### Prefill-decode correlation", ""]
    both = {n: c for n, c in ds.class_counts.items() if "prefill" in c and "decode" in c}
    if not both and ds.pd_corr_requests is None:
        return lines + [
            "Not available: no class or record has both prefill and decode routing.",
            "",
        ]
    lines += [
        "Pearson correlation of per-expert counts between prefill and decode, per layer "
        "(as paper B).",
        "",
    ]
    series, rows = {}, []
    for name, c in sorted(both.items()):
        r = stats.pearson_per_layer(c["prefill"], c["decode"])
        series[name] = r
        rows.append(
            [
                f"class {name}",
                str(ds.class_requests.get(name, 0)),
                _fmt(_mean(r)),
                _fmt(_min(r)),
                _fmt(_max(r)),
            ]
        )
    undefined = np.zeros(ds.model.num_moe_layers, dtype=bool)
    for r in series.values():
        undefined |= ~np.isfinite(r)
    if ds.pd_corr_requests is not None and ds.granularity == "request":
        undefined |= ~np.isfinite(ds.pd_corr_requests).all(axis=0)
        per_layer = stats.finite_mean(ds.pd_corr_requests, axis=0)
        series["per request (mean)"] = per_layer
        rows.append(
            [
                "each request separately",
                str(len(ds.pd_corr_requests)),
                _fmt(_mean(per_layer)),
                _fmt(_min(per_layer)),
                _fmt(_max(per_layer)),
            ]
        )
    lines += _table(["over", "records", "mean over layers", "min layer", "max layer"], rows)
    if undefined.any():
        lines += [
            f"Pearson's r is undefined in {_layer_list(ds, undefined)} for some of the rows: "
            "per-expert counts without variance in prefill or in decode (no load, or every "
            "expert taking the same number of tokens, e.g. when top-k equals the expert "
            "count). Those layers are left out of the row's figures; n/a means every layer "
            "was.",
            "",
        ]
    lines += [
        _line_plot(
            ds, figs, "prefill-decode", "prefill-decode Pearson per layer", "Pearson r", series
        ),
        "",
    ]
    return lines


def _section_coactivation(ds: DatasetStats, figs: _Figures) -> list[str]:
    import matplotlib.pyplot as plt

    lines = ["### Co-activation within a layer", ""]
    if ds.coact is None:
        return lines + [f"Not available: {ds.notes.get('coact')}.", ""]
    share = stats.top_pair_share(ds.coact, TOP_FRACTION)  # nan: no co-activated pair
    best = _argmax(share)
    if best is None:
        return lines + [
            f"Not available: over {ds.coact_tokens} tokens no layer has a token with two "
            "experts recorded.",
            "",
        ]
    lift = stats.coactivation_lift(ds.coact, ds.coact_tokens)  # nan: expected < 5 times
    finite = np.isfinite(lift)
    has_lift = finite.any(axis=(1, 2))
    max_lift = np.where(has_lift, np.where(finite, lift, -np.inf).max(axis=(1, 2)), np.nan)
    if has_lift.any():
        lift_text = (
            f"Highest pair lift (observed / expected if independent, pairs expected >= 5 "
            f"times) per layer: median {_fmt(float(np.median(max_lift[has_lift])))}, max "
            f"{_fmt(_max(max_lift))}"
            + ("." if has_lift.all() else f" (over {_layer_list(ds, has_lift)} only).")
        )
    else:
        lift_text = (
            "Pair lift (observed / expected if independent) is not estimated: no pair is "
            f"expected >= 5 times in {ds.coact_tokens} tokens."
        )
    lines += [
        f"Over {ds.coact_tokens} tokens: the top {int(TOP_FRACTION * 100)}% of expert pairs "
        f"carry **{_fmt(_mean(share) * 100, 1)}%** of a layer's co-activations on "
        f"average ({int(TOP_FRACTION * 100)}% if uniform; range "
        f"{_fmt(_min(share) * 100, 1)}-{_fmt(_max(share) * 100, 1)}%"
        + (
            f"; no co-activated pair in {_layer_list(ds, np.isnan(share))}, left out"
            if np.isnan(share).any()
            else ""
        )
        + f"). {lift_text}",
        "",
    ]
    layer_lift = lift[best]
    iu, ju = np.triu_indices(layer_lift.shape[0], k=1)
    keep = np.isfinite(layer_lift[iu, ju])
    pairs = sorted(
        zip(layer_lift[iu, ju][keep].tolist(), iu[keep].tolist(), ju[keep].tolist(), strict=True),
        reverse=True,
    )
    layer_id = ds.model.moe_layer_ids[best]
    if pairs:
        lines += [f"Most concentrated layer: {layer_id}; its strongest pairs:", ""]
        lines += _table(
            ["experts", "co-activations", "lift"],
            [[f"{i} + {j}", str(int(ds.coact[best, i, j])), _fmt(v)] for v, i, j in pairs[:5]],
        )
    else:
        lines += [
            f"Most concentrated layer: {layer_id}; none of its pairs is expected >= 5 times, "
            "so no pair lift is listed.",
            "",
        ]
    panels = 2 if pairs else 1
    fig, axes = plt.subplots(
        1, panels, figsize=(5 * panels, 3.8), squeeze=False, layout="constrained"
    )
    ax1 = axes[0, 0]
    ax1.plot(share * 100, marker=".")
    ax1.axhline(TOP_FRACTION * 100, color="grey", linestyle="--", linewidth=1)
    ax1.set_xlabel("MoE layer index")
    ax1.set_ylabel(f"% co-activations in top {int(TOP_FRACTION * 100)}% pairs")
    ax1.grid(alpha=0.3)
    if pairs:
        ax2 = axes[0, 1]
        im = ax2.imshow(
            np.log2(np.nan_to_num(layer_lift, nan=1.0).clip(1 / 8, 8)),
            cmap="RdBu_r",
            vmin=-3,
            vmax=3,
            interpolation="nearest",
        )
        ax2.set_title(f"pair lift, layer {layer_id} (log2)", fontsize=9)
        ax2.set_xlabel("expert")
        ax2.set_ylabel("expert")
        fig.colorbar(im, ax=ax2, shrink=0.8)
    fig.suptitle(f"{ds.name}: co-activation", fontsize=10)
    lines += [figs.save(fig, f"{_slug(ds.name)}-coactivation.png", f"{ds.name} co-activation"), ""]
    return lines


def _summary(datasets: Sequence[DatasetStats]) -> list[str]:
    """One row per dataset with the headline figures; n/a where a figure does not apply."""
    rows = []
    for ds in datasets:
        placement = ds.class_placement_counts()
        phase = next(p for p in ("decode", "prefill", "mixed") if p in ds.phases)
        imbalance = _mean(stats.load_imbalance(ds.total_counts(phase)))
        pairs = stats.pairwise_js(placement)
        js = _mean(np.array([_mean(v) for v in pairs.values()])) if pairs else np.nan
        pd = _finite(
            np.array(
                [
                    _mean(stats.pearson_per_layer(c["prefill"], c["decode"]))
                    for c in ds.class_counts.values()
                    if "prefill" in c and "decode" in c
                ]
            )
        )
        share = (
            _mean(stats.top_pair_share(ds.coact, TOP_FRACTION)) if ds.coact is not None else np.nan
        )
        rows.append(
            [
                ds.name,
                f"{ds.num_requests} ({ds.granularity})",
                str(len(placement)),
                f"{_fmt(imbalance)} ({phase})",
                _fmt(js, 3),
                _fmt(float(ds.accuracy.mean()) * 100, 1) + "%"
                if ds.accuracy is not None
                else "n/a",
                _fmt(float(np.mean(pd))) if pd.size else "n/a",
                _fmt(share * 100, 1) + "%" if np.isfinite(share) else "n/a",
            ]
        )
    header = [
        "dataset",
        "records",
        "classes",
        "load imbalance (max/mean, mean over layers)",
        "JS between classes (bits)",
        "class from activations",
        "prefill-decode Pearson (classes)",
        f"co-activations in top {int(TOP_FRACTION * 100)}% pairs",
    ]
    return ["## Summary", "", *_table(header, rows)]


def render(datasets: Sequence[DatasetStats], figs: _Figures, command: str) -> str:
    lines = [
        "# Expert activation analysis",
        "",
        f"Generated by moe-scheduler {__version__} on "
        f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} with:",
        "",
        "```",
        command,
        "```",
        "",
        "Layer numbers in tables are model layer ids; figure x-axes count MoE layers from 0.",
        "",
    ]
    lines += _summary(datasets)
    for ds in datasets:
        lines += _section_model(ds)
        lines += _section_imbalance(ds, figs)
        lines += _section_specificity(ds, figs)
        lines += _section_prefill_decode(ds, figs)
        lines += _section_coactivation(ds, figs)
    return "\n".join(lines).rstrip() + "\n"


def write_report(datasets: Sequence[DatasetStats], out: Path, command: str) -> Path:
    """Write ``out`` (Markdown) and its figures directory; returns the figures directory."""
    fig_dir = out.with_name(f"{out.stem}-figures")
    tmp_dir = out.with_name(f".{fig_dir.name}.tmp-{os.getpid()}")
    tmp_md = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        text = render(datasets, _Figures(tmp_dir, fig_dir.name), command)
        tmp_md.write_text(text, encoding="utf-8")
        shutil.rmtree(fig_dir, ignore_errors=True)
        tmp_dir.rename(fig_dir)
        os.replace(tmp_md, out)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_md.unlink(missing_ok=True)
    return fig_dir
