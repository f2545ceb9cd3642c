"""Per-request expert prediction for the server, in the modes of docs/server.md.

Pure (no network): the service runs the probe request itself and hands its routed
experts to :meth:`RequestPredictor.from_routing`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from scheduler.server.cluster import ClusterState


@dataclass(frozen=True)
class Prediction:
    """``cls``: a plan class or None; ``source``: hint, text, probe, conversation or none;
    ``histogram``: predicted [moe_layers, experts] (token, expert) counts of the request,
    or None."""

    cls: str | None
    source: str
    histogram: np.ndarray | None = None


class RequestPredictor:
    """Class and expert-histogram predictions from one :class:`ClusterState`.

    ``conversations``: how many conversations' last routing is remembered (LRU).
    """

    def __init__(self, cluster: ClusterState, conversations: int = 10_000) -> None:
        self.cluster = cluster
        self._conversations: OrderedDict[str, np.ndarray] = OrderedDict()
        self._max_conversations = conversations

    def class_histogram(self, cls: str | None, tokens: int) -> np.ndarray | None:
        shares = self.cluster.class_shares.get(cls) if cls is not None else None
        return None if shares is None else shares * max(tokens, 1)

    def from_hint(self, cls: str, tokens: int) -> Prediction:
        return Prediction(cls, "hint", self.class_histogram(cls, tokens))

    def from_text(self, text: str, tokens: int) -> Prediction:
        """The learned text -> cluster predictor when it is in force (its cluster is the
        plan class ``cluster-<c>``, its histogram the clusters' mixture), else the
        domain classifier on the prompt, mapped to a plan class."""
        bundle = self.cluster.bundle
        if bundle is None or not text:
            return Prediction(None, "none")
        learned = self.cluster.text_histogram
        if learned is not None:  # the bundle's text -> cluster predictor is in force
            cluster, shares = learned.predict_one(text)
            return Prediction(f"cluster-{cluster}", "text", shares * max(tokens, 1))
        domain, _ = bundle.domain.predict_one(text)
        cls = self.cluster.class_map.get(domain, domain)
        return Prediction(cls, "text", self.class_histogram(cls, tokens))

    def from_routing(self, counts: np.ndarray, tokens: int, source: str) -> Prediction:
        """Decode histogram from observed routing ``counts [moe_layers, experts]`` (a probe's
        prompt, or the previous turn): the bundle's prefill->decode predictor when it was
        fitted for this model, else the observed shares themselves."""
        counts = np.asarray(counts, dtype=np.float64)
        bundle = self.cluster.bundle
        if bundle is not None and bundle.prefill_decode is not None:
            shares = bundle.prefill_decode.predict(counts[None])[0] * self.cluster.model.top_k
        else:
            per_layer = counts.sum(axis=1, keepdims=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                shares = np.where(per_layer > 0, counts / per_layer, 0) * self.cluster.model.top_k
        return Prediction(self.best_class(shares), source, shares * max(tokens, 1))

    def best_class(self, shares: np.ndarray) -> str | None:
        """The profile class whose expert shares are closest (L1) to ``shares``."""
        best, best_d = None, np.inf
        for name, ref in self.cluster.class_shares.items():
            d = float(np.abs(ref - shares).sum())
            if d < best_d:
                best, best_d = name, d
        return best

    def remember(self, conversation_id: str, counts: np.ndarray) -> None:
        if not conversation_id:
            return
        self._conversations[conversation_id] = counts
        self._conversations.move_to_end(conversation_id)
        while len(self._conversations) > self._max_conversations:
            self._conversations.popitem(last=False)

    def from_conversation(self, conversation_id: str, tokens: int) -> Prediction | None:
        counts = self._conversations.get(conversation_id) if conversation_id else None
        if counts is None:
            return None
        return self.from_routing(counts, tokens, "conversation")
