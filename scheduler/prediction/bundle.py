"""The model bundle: every fitted predictor in one versioned, checksummed file.

Format (``docs/predictors.md``): a numpy ``.npz`` archive (a zip of ``.npy`` arrays)
holding

* ``__meta__``: UTF-8 JSON as a uint8 array -- ``format`` (``moe-scheduler-predictors``),
  ``format_version``, the package version, the model shape (or null), each component's
  parameters, training metadata (data fingerprint, held-out scores) and ``sha256``;
* ``<component>.<array>``: the components' numeric arrays (plain dtypes only).

Loading uses ``np.load(..., allow_pickle=False)``: no object arrays, no pickle, so a
bundle cannot run code. ``sha256`` covers the metadata (without itself) and every
array's name, dtype, shape and bytes; a mismatch means the file is corrupt or was
edited. A bundle of another format version, or one fitted for another model shape
than the caller serves, is refused with an :class:`InputError` saying why.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scheduler import __version__
from scheduler.errors import InputError
from scheduler.model_shape import ModelShape
from scheduler.prediction.clusters import ActivationClusters
from scheduler.prediction.drift import ClassMixDrift
from scheduler.prediction.prefill_decode import PrefillDecodePredictor
from scheduler.prediction.text_classifier import TextClassifier
from scheduler.prediction.text_cluster import TextClusterClassifier

FORMAT = "moe-scheduler-predictors"
FORMAT_VERSION = 1
META_KEY = "__meta__"


@dataclass
class PredictorBundle:
    """Fitted predictors. ``domain`` is always there; the others need routing data.

    ``model`` is the MoE model shape the routing-based components were fitted for.
    """

    domain: TextClassifier
    domain_drift: ClassMixDrift | None = None
    model: ModelShape | None = None
    clusters: ActivationClusters | None = None
    text_cluster: TextClusterClassifier | None = None
    prefill_decode: PrefillDecodePredictor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def components(self) -> dict[str, Any]:
        """Name -> fitted object, for the components present."""
        parts: dict[str, Any] = {
            "domain": self.domain,
            "domain_drift": self.domain_drift,
            "clusters": self.clusters,
            "text_cluster": None if self.text_cluster is None else self.text_cluster.text_,
            "cluster_drift": None if self.text_cluster is None else self.text_cluster.drift_,
            "prefill_decode": self.prefill_decode,
        }
        return {name: obj for name, obj in parts.items() if obj is not None}


def _digest(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    body = {k: v for k, v in meta.items() if k != "sha256"}
    h.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"\0{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_bundle(bundle: PredictorBundle, path: Path) -> str:
    """Write ``bundle`` to ``path`` atomically; returns its sha256."""
    if bundle.text_cluster is not None and bundle.text_cluster.clusters is not bundle.clusters:
        raise ValueError("the text-to-cluster classifier must use the bundle's clusters")
    arrays: dict[str, np.ndarray] = {}
    params: dict[str, Any] = {}
    for name, obj in bundle.components().items():
        p, a = obj.get_state()
        params[name] = p
        arrays.update({f"{name}.{k}": np.asarray(v) for k, v in a.items()})
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "model": None if bundle.model is None else bundle.model.to_dict(),
        "components": params,
        "metadata": bundle.metadata,
    }
    meta["sha256"] = _digest(meta, arrays)
    arrays[META_KEY] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return str(meta["sha256"])


def read_bundle_meta(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Open a bundle, check format, version and checksum; return (meta, arrays)."""
    if not path.is_file():
        raise InputError(path, "does not exist")
    if not zipfile.is_zipfile(path):
        raise InputError(path, "not a predictor bundle (not an .npz archive)")
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
            arrays = {key: z[key] for key in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(path, f"not a readable predictor bundle ({e})") from None
    raw = arrays.pop(META_KEY, None)
    try:
        meta = json.loads(raw.tobytes().decode("utf-8")) if raw is not None else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(path, f"not a {FORMAT} bundle (no valid {META_KEY} entry)")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise InputError(
            path,
            f"bundle format version {version!r} (written by moe-scheduler "
            f"{meta.get('package_version', '?')}); this build ({__version__}) reads version "
            f"{FORMAT_VERSION}: refit it with `moe-scheduler fit`",
        )
    if meta.get("sha256") != _digest(meta, arrays):
        raise InputError(path, "checksum mismatch: the bundle is corrupt or was modified")
    return meta, arrays


def load_bundle(path: Path, *, model: ModelShape | None = None) -> PredictorBundle:
    """Load and verify a bundle; ``model``, if given, must match the bundle's model."""
    meta, arrays = read_bundle_meta(path)
    bundle_model = None
    if meta.get("model") is not None:
        bundle_model = ModelShape.from_dict(meta["model"], path)
    if model is not None and bundle_model is not None and model != bundle_model:
        raise InputError(
            path,
            f"bundle was fitted for model {bundle_model.name} "
            f"({bundle_model.num_moe_layers} MoE layers x {bundle_model.num_experts} experts, "
            f"top-{bundle_model.top_k}), not {model.name} ({model.num_moe_layers} x "
            f"{model.num_experts}, top-{model.top_k}); refit it for this model",
        )
    params = meta.get("components", {})

    def part(name: str, cls: Any) -> Any:
        if name not in params:
            return None
        prefix = f"{name}."
        mine = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
        try:
            return cls.from_state(params[name], mine)
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(path, f"component {name!r} is invalid ({e})") from None

    domain = part("domain", TextClassifier)
    if domain is None:
        raise InputError(path, "bundle has no domain classifier")
    clusters = part("clusters", ActivationClusters)
    text = part("text_cluster", TextClassifier)
    text_cluster = None
    if text is not None:
        drift = part("cluster_drift", ClassMixDrift)
        if clusters is None or drift is None:
            raise InputError(path, "text-to-cluster classifier without its clusters or drift")
        text_cluster = TextClusterClassifier(clusters, text=text, drift=drift)
        text_cluster.text_, text_cluster.drift_ = text, drift
        text_cluster.drift_result_ = None
    prefill_decode = part("prefill_decode", PrefillDecodePredictor)
    for component in (clusters, prefill_decode):
        shape = getattr(component, "cluster_counts_", getattr(component, "prior_", None))
        if shape is not None and bundle_model is not None:
            expected = (bundle_model.num_moe_layers, bundle_model.num_experts)
            if shape.shape[-2:] != expected:
                raise InputError(path, f"component arrays do not match the model {expected}")
    return PredictorBundle(
        domain=domain,
        domain_drift=part("domain_drift", ClassMixDrift),
        model=bundle_model,
        clusters=clusters,
        text_cluster=text_cluster,
        prefill_decode=prefill_decode,
        metadata=dict(meta.get("metadata", {})),
    )
