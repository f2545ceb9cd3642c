"""The domain labels: sources relabelled by rule, and the scores reported under both label
sets and per source (generated prompts, not real data)."""

import gzip
import json

import numpy as np
import pytest

from scheduler.prediction.datasets import SOURCE_RELABELS, load_prompts, relabel_sources
from scheduler.prediction.training import FitConfig, domain_split, fit_domain, validation_split
from tests.prediction_data import prompts

RELABELLED = "alpaca_eval:oasst"


@pytest.fixture
def data_dir(tmp_path):
    """Four domains; the general folder holds a task-style source and a chat-like one that
    :data:`SOURCE_RELABELS` moves to chat."""
    folders = {
        "code": [("mbpp", t) for t in prompts("code", 40)],
        "math": [("gsm8k_train", t) for t in prompts("math", 40)],
        "chat": [("sharegpt_v3", t) for t in prompts("chat", 40)],
        "general": [("p3_t0_train_sample", t) for t in prompts("general", 30)]
        + [(RELABELLED, t) for t in prompts("chat", 20, seed=5)],
    }
    root = tmp_path / "data"
    for domain, rows in folders.items():
        folder = root / "prompts" / domain
        folder.mkdir(parents=True)
        with gzip.open(folder / f"{domain}_prompts.jsonl.gz", "wt", encoding="utf-8") as f:
            for i, (source, text) in enumerate(rows):
                row = {"id": f"{domain}/{i}", "domain": domain, "source": source, "prompt": text}
                f.write(json.dumps(row) + "\n")
    return root


def test_relabelling_changes_labels_never_rows(data_dir):
    assert SOURCE_RELABELS[RELABELLED] == "chat"
    published = load_prompts(data_dir / "prompts")
    moved = relabel_sources(published, SOURCE_RELABELS)
    rows = published.sources == RELABELLED
    assert len(moved) == len(published) and np.array_equal(moved.texts, published.texts)
    assert set(moved.domains[rows]) == {"chat"} and set(moved.published_domains[rows]) == {
        "general"
    }
    assert np.array_equal(moved.relabelled, rows) and not published.relabelled.any()
    assert np.array_equal(moved.domains[~rows], published.domains[~rows])

    used, train, test = domain_split(FitConfig(data_dir=data_dir, relabel_sources=True))
    as_published, p_train, p_test = domain_split(FitConfig(data_dir=data_dir))
    assert np.array_equal(train, p_train) and np.array_equal(test, p_test)
    assert used.relabelled.sum() == 20 and not as_published.relabelled.any()
    fit_rows, val_rows = validation_split(used, train, FitConfig(data_dir=data_dir))
    assert len(fit_rows) and len(val_rows) and not set(fit_rows) & set(val_rows)
    assert set(fit_rows) | set(val_rows) == set(train)


def test_fit_reports_both_label_sets_and_predictions_per_source(data_dir):
    model, _, report, _ = fit_domain(FitConfig(data_dir=data_dir, relabel_sources=True))
    assert report["relabelled_sources"] == {RELABELLED: "chat"}
    assert report["published_labels"]["n"] == report["n"] == report["test"]
    sources = report["sources"]
    assert set(sources) == {"mbpp", "gsm8k_train", "sharegpt_v3", "p3_t0_train_sample", RELABELLED}
    moved = sources[RELABELLED]
    assert moved["label"] == "chat" and moved["published_label"] == "general"
    assert "published_label" not in sources["mbpp"]
    without = report["without_disagreeing_sources"]
    assert without["n"] == report["n"] - moved["n"]
    # the per-source predictions add up to the confusion matrix's columns
    labels = report["confusion"]["labels"]
    assert labels == model.classes_.tolist()
    columns = np.array(report["confusion"]["matrix"]).sum(axis=0)
    for i, c in enumerate(labels):
        assert sum(s["predicted"][c] for s in sources.values()) == columns[i]
    for s in sources.values():
        assert sum(s["predicted"].values()) == s["n"] and 0 <= s["accuracy"] <= 1

    _, _, plain, _ = fit_domain(FitConfig(data_dir=data_dir))  # the default: published labels
    assert plain["labels"] == "published" and plain["relabelled_sources"] == {}
    assert plain["without_disagreeing_sources"]["n"] == plain["n"] - moved["n"]
    assert plain["sources"][RELABELLED]["label"] == "general"
