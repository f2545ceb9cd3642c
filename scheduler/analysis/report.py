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
            imb = stats.load_imbalance(counts)
            worst = int(np.nanargmax(imb))
            rows.append(
                [
                    name,
                    phase,
                    _fmt(np.nanmean(imb)),
                    _fmt(imb[worst]),
                    str(ds.model.moe_layer_ids[worst]),
                ]
            )
            if name == "all classes":
                series[phase] = imb
    lines += _table(["class", "phase", "mean over layers", "worst layer", "worst layer id"], rows)
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
    lines += _table(["phase", "model layer", "expert", "load / mean"], hot_rows)
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
    pairs = stats.pairwise_js(placement)
    js_mean = np.mean(np.stack(list(pairs.values())), axis=0)
    lines += [
        "Jensen-Shannon divergence (bits, 0 = identical, 1 = disjoint) between the classes' "
        "per-layer expert distributions (decode counts where present, else prefill):",
        "",
        f"- mean over layers and class pairs: **{_fmt(float(js_mean.mean()), 3)}**; "
        f"most specific layer: {ds.model.moe_layer_ids[int(np.argmax(js_mean))]} "
        f"({_fmt(float(js_mean.max()), 3)}); least: "
        f"{ds.model.moe_layer_ids[int(np.argmin(js_mean))]} ({_fmt(float(js_mean.min()), 3)})",
        "",
    ]
    lines += _table(
        ["class pair", "mean JS over layers", "max JS (layer)"],
        [
            [
                f"{a} / {b}",
                _fmt(float(v.mean()), 3),
                f"{_fmt(float(v.max()), 3)} ({ds.model.moe_layer_ids[int(np.argmax(v))]})",
            ]
            for (a, b), v in sorted(pairs.items())
        ],
    )
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
                _fmt(np.nanmean(r)),
                _fmt(np.nanmin(r)),
                _fmt(np.nanmax(r)),
            ]
        )
    if ds.pd_corr_requests is not None and ds.granularity == "request":
        per_layer = np.nanmean(ds.pd_corr_requests, axis=0)
        series["per request (mean)"] = per_layer
        rows.append(
            [
                "each request separately",
                str(len(ds.pd_corr_requests)),
                _fmt(np.nanmean(per_layer)),
                _fmt(np.nanmin(per_layer)),
                _fmt(np.nanmax(per_layer)),
            ]
        )
    lines += _table(["over", "records", "mean over layers", "min layer", "max layer"], rows)
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
    lift = stats.coactivation_lift(ds.coact, ds.coact_tokens)
    share = stats.top_pair_share(ds.coact, TOP_FRACTION)
    best = int(np.nanargmax(share))
    with np.errstate(invalid="ignore"):
        max_lift = np.nanmax(np.where(np.isfinite(lift), lift, -np.inf), axis=(1, 2))
    lines += [
        f"Over {ds.coact_tokens} tokens: the top {int(TOP_FRACTION * 100)}% of expert pairs "
        f"carry **{_fmt(float(np.nanmean(share)) * 100, 1)}%** of a layer's co-activations on "
        f"average ({int(TOP_FRACTION * 100)}% if uniform; range "
        f"{_fmt(float(np.nanmin(share)) * 100, 1)}-{_fmt(float(np.nanmax(share)) * 100, 1)}%). "
        f"Highest pair lift (observed / expected if independent, pairs expected >= 5 times) "
        f"per layer: median {_fmt(float(np.nanmedian(max_lift)))}, max "
        f"{_fmt(float(np.nanmax(max_lift)))}.",
        "",
    ]
    layer_lift = lift[best]
    pairs = [
        (float(layer_lift[i, j]), i, j)
        for i in range(layer_lift.shape[0])
        for j in range(i + 1, layer_lift.shape[0])
        if np.isfinite(layer_lift[i, j])
    ]
    pairs.sort(reverse=True)
    layer_id = ds.model.moe_layer_ids[best]
    lines += [f"Most concentrated layer: {layer_id}; its strongest pairs:", ""]
    lines += _table(
        ["experts", "co-activations", "lift"],
        [[f"{i} + {j}", str(int(ds.coact[best, i, j])), _fmt(v)] for v, i, j in pairs[:5]],
    )
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    ax1.plot(share * 100, marker=".")
    ax1.axhline(TOP_FRACTION * 100, color="grey", linestyle="--", linewidth=1)
    ax1.set_xlabel("MoE layer index")
    ax1.set_ylabel(f"% co-activations in top {int(TOP_FRACTION * 100)}% pairs")
    ax1.grid(alpha=0.3)
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
        imbalance = float(np.nanmean(stats.load_imbalance(ds.total_counts(phase))))
        pairs = stats.pairwise_js(placement)
        js = float(np.mean([v.mean() for v in pairs.values()])) if pairs else np.nan
        pd = [
            float(np.nanmean(stats.pearson_per_layer(c["prefill"], c["decode"])))
            for c in ds.class_counts.values()
            if "prefill" in c and "decode" in c
        ]
        share = (
            float(np.nanmean(stats.top_pair_share(ds.coact, TOP_FRACTION)))
            if ds.coact is not None
            else np.nan
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
                _fmt(float(np.mean(pd))) if pd else "n/a",
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
