"""Draw per-request routed experts from a real per-class routing profile.

Pure: arrays and a ``numpy.random.Generator`` in, arrays out. Nothing here is measured
routing: every id is DRAWN, token by token, from a class's real per-layer expert
histogram (a workload profile), with per-request variation.

For one class and MoE layer ``l`` the profile gives ``share[l, e]``, the fraction of the
class's routed (token, slot) pairs that went to expert ``e``; ``top_k * share[l, e]`` is
then the probability that a token of the class uses ``e`` at ``l`` (at most 1: a token
uses an expert at most once). A request draws

1. its own shares ``q[l] ~ Dirichlet(concentration * share[l])`` (experts the profile never
   saw stay at zero), so requests of one class differ a little, as real requests do;
2. for every token, ``top_k`` distinct experts per layer whose inclusion probabilities are
   exactly ``pi = top_k * q`` (capped at 1, the excess spread over the others), by
   systematic sampling over a per-request random order of the experts.

So, over many requests, each expert's per-layer frequency converges to the profile's
share. The same per-request perturbation is applied to the prefill and the decode shares,
so a request's prompt routing predicts its decode routing, as paper B and ELDR measure
on real models (docs/sources.md).
Co-activation between experts within a token is not modelled beyond that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scheduler.model_shape import ModelShape
from scheduler.profile import ClassProfile

#: Default Dirichlet concentration of the per-request perturbation (see docs/emulator.md).
DEFAULT_CONCENTRATION = 1000.0


@dataclass(frozen=True)
class ClassRouting:
    """A class's per-layer expert shares. prefill, decode: [moe_layers, experts], rows sum 1."""

    prefill: np.ndarray
    decode: np.ndarray


@dataclass(frozen=True)
class RequestRouting:
    """One request's inclusion probabilities.

    prefill, decode: [moe_layers, experts], values in [0, 1], rows sum to top_k.
    """

    prefill: np.ndarray
    decode: np.ndarray


def _shares(counts: np.ndarray) -> np.ndarray:
    """Rows normalised to sum to 1; an all-zero row becomes uniform."""
    counts = np.asarray(counts, dtype=np.float64)
    sums = counts.sum(axis=1, keepdims=True)
    uniform = np.full_like(counts, 1.0 / counts.shape[1])
    return np.where(sums > 0, counts / np.where(sums > 0, sums, 1.0), uniform)


def class_routing(profile_class: ClassProfile) -> ClassRouting:
    """Shares from a profile class: prefill counts (else mixed, else decode) for the prompt,
    decode counts (else mixed, else prefill) for generated tokens."""
    counts = profile_class.counts
    prefill = next(p for p in ("prefill", "mixed", "decode") if p in counts)
    decode = next(p for p in ("decode", "mixed", "prefill") if p in counts)
    shares = _shares(counts[prefill])
    # one array when both come from the same counts (draw_request_routing then reuses it)
    return ClassRouting(shares, shares if decode == prefill else _shares(counts[decode]))


def inclusion_probabilities(shares: np.ndarray, top_k: int) -> np.ndarray:
    """[layers, experts] shares (rows sum to 1) -> inclusion probabilities (rows sum to top_k).

    ``top_k * shares``, with any value above 1 capped at 1 and the excess spread over the
    uncapped experts in proportion to their shares (repeated until nothing exceeds 1).
    """
    pi = shares * top_k
    capped = np.zeros(pi.shape, dtype=bool)
    for _ in range(top_k):
        over = pi > 1.0 + 1e-12
        if not over.any():
            break
        capped |= over
        free = np.where(capped, 0.0, shares)
        room = top_k - capped.sum(axis=1, keepdims=True)
        total = free.sum(axis=1, keepdims=True)
        pi = np.where(capped, 1.0, free * room / np.where(total > 0, total, 1.0))
    return np.minimum(pi, 1.0)


def draw_request_routing(
    routing: ClassRouting, top_k: int, concentration: float, rng: np.random.Generator
) -> RequestRouting:
    """Draw one request's inclusion probabilities around its class's shares.

    ``concentration`` is the Dirichlet concentration (larger: requests closer to the class
    profile); ``inf`` disables the perturbation.
    """
    if np.isinf(concentration):
        prefill = routing.prefill
    else:
        prefill = _shares(rng.standard_gamma(concentration * routing.prefill))
    prefill_pi = inclusion_probabilities(prefill, top_k)
    if routing.decode is routing.prefill:
        return RequestRouting(prefill_pi, prefill_pi)
    ratio = np.divide(
        prefill, routing.prefill, out=np.ones_like(prefill), where=routing.prefill > 0
    )
    decode_pi = inclusion_probabilities(_shares(routing.decode * ratio), top_k)
    return RequestRouting(prefill_pi, decode_pi)


def sample_token_experts(
    pi: np.ndarray, tokens: int, top_k: int, rng: np.random.Generator
) -> np.ndarray:
    """Draw ``top_k`` distinct experts per token and layer with inclusion probabilities ``pi``.

    pi: [layers, experts], rows sum to top_k, values in [0, 1]. Returns int32
    [tokens, layers, top_k]. Systematic sampling: the experts of a layer, in a random
    order, cover consecutive intervals of length pi[e] on [0, top_k); a token takes the
    experts under the points ``u, u + 1, ..., u + top_k - 1`` for one uniform ``u``. Each
    interval is at most 1 long, so the ``top_k`` experts are distinct.
    """
    layers, experts = pi.shape
    if tokens <= 0:
        return np.zeros((0, layers, top_k), dtype=np.int32)
    rows = np.arange(layers)[:, None]
    order = np.argsort(rng.random((layers, experts)), axis=1)
    cum = np.cumsum(pi[rows, order], axis=1)
    cum[:, -1] = top_k  # absorb rounding so every point falls inside its layer
    stride = top_k + 1  # layer j's intervals live in [j * stride, j * stride + top_k)
    flat = (cum + rows * stride).ravel()
    # points laid out [layers, tokens, top_k]: nearly sorted, which searchsorted likes
    points = rng.random((layers, tokens, 1)) + (np.arange(top_k) + rows[:, :, None] * stride)
    index = np.searchsorted(flat, points.ravel(), side="right").reshape(points.shape)
    index -= (rows * experts)[:, :, None]
    return order[rows[:, :, None], index].transpose(1, 0, 2).astype(np.int32)


def expand_to_hidden_layers(ids: np.ndarray, model: ModelShape) -> np.ndarray:
    """[tokens, moe_layers, top_k] -> [tokens, hidden_layers, top_k], dense-layer rows zero
    (as SGLang's ``routed_experts`` has them)."""
    out = np.zeros((ids.shape[0], model.num_hidden_layers, model.top_k), dtype=np.int32)
    out[:, list(model.moe_layer_ids), :] = ids
    return out
