"""Exact locality metrics of routed tokens under a placement (docs/cost-model.md).

Inputs are per-token routed expert ids ``token_ids [tokens, layers, top_k]`` (``-1`` = not
recorded) and the DP rank of every token ``ranks [tokens]``; every expert is reached
through SGLang's static dispatch (:func:`~scheduler.accounting.dispatch.static_dispatch_table`).

How it stays fast (no Python loop over tokens): the dispatch table is turned once per
placement into a code per (rank, layer, expert): one bit for the destination node when it
is another node, one bit for the destination GPU's index within the node when it is
another GPU of the same node. A token-layer's codes are OR-ed over its ``top_k`` experts;
the popcounts of the two bit fields are its node copies and intra-node copies. One
``bincount`` of the same table indices gives the (rank, layer, expert) counts, from which
remote hits and GPU expert loads follow on the small table. For small batches (fewer
routing events than table cells, e.g. one decode step of a simulator) the same two
quantities are taken from the events directly instead, so a step costs O(events), not
O(table). The two paths are :class:`_TableStats` and :class:`_EventStats`; both are
exact and agree (tests/test_accounting_layers.py), and each is the faster one on its
side of that threshold, so both stay.

``per_layer=True`` also keeps node and intra-node copies per (rank, layer): what exact
per-layer padding of the all-to-all needs
(:meth:`~scheduler.accounting.CostModel.padded_layer_time`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np

from scheduler.accounting.dispatch import static_dispatch_table
from scheduler.model_shape import ModelShape
from scheduler.placement.placement import Placement
from scheduler.placement.topology import Topology

#: FP8 dispatch carries one FP32 scale per 128 channels (DeepEP; docs/sources.md).
FP8_SCALE_BLOCK = 128
#: Token-layers handled per chunk: bounds the memory of the per-event temporaries.
CHUNK_TOKEN_LAYERS = 1 << 18


@dataclass(frozen=True)
class BytesPerCopy:
    """Bytes one token sends to one destination: FP8 dispatch (with scales) and BF16 combine."""

    dispatch: int
    combine: int

    @property
    def total(self) -> int:
        return self.dispatch + self.combine


def bytes_per_copy(hidden_size: int, fp8_scales: bool = True) -> BytesPerCopy:
    """hidden x 1 B (+ one 4 B scale per 128 channels) dispatch, hidden x 2 B combine."""
    scales = 4 * -(-hidden_size // FP8_SCALE_BLOCK) if fp8_scales else 0
    return BytesPerCopy(dispatch=hidden_size + scales, combine=2 * hidden_size)


@dataclass(frozen=True)
class StepTraffic:
    """Per decode (or batch) step: ``steps [steps]`` the step ids, in increasing order;
    ``rank_inter_node_bytes [steps, ranks]`` dispatch + combine bytes each rank sends
    across nodes (combine counted at the rank it returns to); ``max_rank_inter_node_bytes
    [steps]`` the max over ranks, which the all-to-all pads to; likewise for NVLink."""

    steps: np.ndarray
    rank_inter_node_bytes: np.ndarray
    max_rank_inter_node_bytes: np.ndarray
    rank_intra_node_bytes: np.ndarray
    max_rank_intra_node_bytes: np.ndarray


@dataclass(frozen=True)
class Accounting:
    """Exact traffic and load of a set of routed tokens (sums over tokens and layers).

    token_layers: recorded (token, layer) pairs. remote_hits: experts reached on another
    node. node_copies: distinct other nodes reached per token-layer (DeepEP normal
    kernels). intra_node_copies: distinct other GPUs of the same node reached.
    Per-rank arrays are ``[ranks]``: ``rank_tokens`` tokens, ``rank_remote_hits``,
    ``rank_node_copies``, ``rank_intra_node_copies``, and bytes (dispatch + combine) sent
    over the NIC / NVLink. ``gpu_load [layers, gpus]``: (token, expert) pairs each GPU
    processes; ``gpu_distinct_experts [layers, gpus]``: distinct logical experts each GPU
    serves (whose weights it reads once per step when the tokens are one step);
    ``gpu_load_imbalance [layers]``: max / mean over GPUs (nan for a layer with
    no tokens). ``steps``: per-step traffic when step ids were given.
    ``rank_layer_node_copies`` / ``rank_layer_intra_node_copies [ranks, layers]``: copies
    per rank and MoE layer, when asked for (``per_layer=True``), else None.
    """

    token_layers: int
    remote_hits: int
    node_copies: int
    intra_node_copies: int
    bytes_per_copy: BytesPerCopy
    rank_tokens: np.ndarray
    rank_remote_hits: np.ndarray
    rank_node_copies: np.ndarray
    rank_intra_node_copies: np.ndarray
    rank_inter_node_bytes: np.ndarray
    rank_intra_node_bytes: np.ndarray
    gpu_load: np.ndarray
    gpu_load_imbalance: np.ndarray
    #: (layer, GPU, expert) cells reached, as ``(layer * gpus + gpu) * experts + e``
    #: (repeats allowed); :attr:`gpu_distinct_experts` is derived from them on first use.
    served_cells: np.ndarray = field(repr=False)
    num_experts: int
    steps: StepTraffic | None = None
    rank_layer_node_copies: np.ndarray | None = None
    rank_layer_intra_node_copies: np.ndarray | None = None

    @cached_property
    def gpu_distinct_experts(self) -> np.ndarray:
        """[layers, gpus] distinct experts each GPU serves (computed when first asked for:
        the server's per-request accounting never needs it)."""
        layers, gpus = self.gpu_load.shape
        hit = np.zeros(layers * gpus * self.num_experts, dtype=bool)
        hit[self.served_cells] = True
        return hit.reshape(layers, gpus, self.num_experts).sum(axis=2)

    @property
    def inter_node_bytes(self) -> int:
        return self.node_copies * self.bytes_per_copy.total

    @property
    def max_rank_inter_node_bytes(self) -> int:
        return int(self.rank_inter_node_bytes.max(initial=0))

    @property
    def remote_hits_per_token_layer(self) -> float:
        return self.remote_hits / self.token_layers if self.token_layers else 0.0

    @property
    def node_copies_per_token_layer(self) -> float:
        return self.node_copies / self.token_layers if self.token_layers else 0.0

    @property
    def intra_node_copies_per_token_layer(self) -> float:
        return self.intra_node_copies / self.token_layers if self.token_layers else 0.0

    @property
    def gpu_load_imbalance_mean(self) -> float:
        imb = self.gpu_load_imbalance[~np.isnan(self.gpu_load_imbalance)]
        return float(imb.mean()) if imb.size else float("nan")

    @property
    def gpu_load_imbalance_worst(self) -> float:
        imb = self.gpu_load_imbalance[~np.isnan(self.gpu_load_imbalance)]
        return float(imb.max()) if imb.size else float("nan")

    @property
    def rank_load_imbalance(self) -> float:
        return float(max_over_mean(self.rank_tokens.astype(np.float64)))


def max_over_mean(values: np.ndarray) -> np.ndarray:
    """max / mean along the last axis (1.0 = balanced; nan where the mean is 0)."""
    mean = values.mean(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, values.max(axis=-1) / np.where(mean > 0, mean, 1), np.nan)


def _code_dtype(bits: int) -> type[np.unsignedinteger]:
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if bits <= np.iinfo(dtype).bits:
            return dtype
    raise ValueError(
        f"nodes + gpus_per_node = {bits} exceeds 64; the bitmask accounting supports "
        "up to 64 (e.g. 56 nodes x 8 GPUs)"
    )


def locality_codes(dest_gpu: np.ndarray, gpus_per_node: int) -> np.ndarray:
    """dest_gpu [ranks, layers, experts] -> codes [ranks, layers, experts + 1].

    Column 0 is 0 (a not-recorded expert, id -1, lands there); column ``e + 1`` holds
    bit ``node`` when expert ``e`` is reached on another node, bit ``nodes + local`` when
    it is reached on another GPU of the same node, and 0 on the rank's own GPU.
    """
    ranks = dest_gpu.shape[0]
    nodes = ranks // gpus_per_node
    dtype = _code_dtype(nodes + gpus_per_node)
    rank = np.arange(ranks)[:, None, None]
    dest_node = dest_gpu // gpus_per_node
    remote = dest_node != rank // gpus_per_node
    same_node_other_gpu = ~remote & (dest_gpu != rank)
    one = dtype(1)
    codes = np.zeros((*dest_gpu.shape[:2], dest_gpu.shape[2] + 1), dtype=dtype)
    codes[..., 1:] = np.where(
        remote,
        np.left_shift(one, dest_node.astype(dtype)),
        np.where(
            same_node_other_gpu,
            np.left_shift(one, (nodes + dest_gpu % gpus_per_node).astype(dtype)),
            dtype(0),
        ),
    )
    return codes


def account(
    placement: Placement,
    topology: Topology,
    model: ModelShape,
    ranks: np.ndarray,
    token_ids: np.ndarray,
    steps: np.ndarray | None = None,
    *,
    dest_gpu: np.ndarray | None = None,
    codes: np.ndarray | None = None,
    fp8_scales: bool = True,
    per_layer: bool = False,
    stats: Literal["auto", "table", "events"] = "auto",
) -> Accounting:
    """Exact metrics of tokens ``token_ids [tokens, layers, top_k]`` served on DP ranks
    ``ranks [tokens]`` under ``placement`` with SGLang's static dispatch.

    ``steps [tokens]`` (optional, any integer ids): adds per-rank per-step bytes.
    ``dest_gpu``: a precomputed :func:`static_dispatch_table` of ``placement`` (computed
    here when omitted; pass it when accounting many batches under one placement), and
    ``codes`` its :func:`locality_codes` likewise. ``per_layer``: also keep copies per
    (rank, layer). ``stats``: how remote hits and GPU loads are counted ("table":
    :class:`_TableStats`, one bincount over the (rank, layer, expert) table; "events":
    :class:`_EventStats`, from each routing event; "auto": whichever is smaller, the
    faster of the two at that size); the results are identical.
    """
    _check(placement, topology, model, ranks, token_ids, steps)
    num_ranks, per_node = placement.num_gpus, placement.gpus_per_node
    tokens, layers, _ = token_ids.shape
    if dest_gpu is None:
        dest_gpu = static_dispatch_table(placement)
    if codes is None:
        codes = locality_codes(dest_gpu, per_node)
    shape = _TableShape(num_ranks, layers, placement.num_experts)
    copies = _Copies(tokens, shape, placement.num_nodes, codes, per_layer)
    by_events = stats == "events" or (stats == "auto" and token_ids.size < shape.size)
    counter: _EventStats | _TableStats = (
        _EventStats(shape, dest_gpu, copies.node_mask)
        if by_events
        else _TableStats(shape, dest_gpu, per_node)
    )
    flat_codes = codes.ravel()
    chunk = max(1, CHUNK_TOKEN_LAYERS // layers)
    for start in range(0, tokens, chunk):
        ids = token_ids[start : start + chunk]
        rank_chunk = ranks[start : start + chunk].astype(np.int32)
        idx = shape.index(rank_chunk, ids)
        code = flat_codes.take(idx)
        copies.add(start, ids, rank_chunk, code)
        counter.add(ids, idx, code, rank_chunk)
    rank_remote_hits, gpu_load, served = counter.totals()
    return _assemble(
        copies, rank_remote_hits, gpu_load, served, shape, model, ranks, steps, fp8_scales
    )


@dataclass(frozen=True)
class _TableShape:
    """The [ranks, layers, experts + 1] code table (column 0: a not-recorded expert)."""

    ranks: int
    layers: int
    experts: int

    @property
    def width(self) -> int:
        return self.experts + 1

    @property
    def size(self) -> int:
        return self.ranks * self.layers * self.width

    def index(self, rank_chunk: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """[tokens, layers, top_k] int32 table indices of the routing events ``ids``."""
        base = rank_chunk[:, None] * (self.layers * self.width)
        layer_base = np.arange(self.layers, dtype=np.int32) * self.width + 1  # +1: "-1"
        return (base + layer_base)[:, :, None] + ids


class _Copies:
    """Node and intra-node copies per token (and per (rank, layer) when asked for):
    a token-layer's codes OR-ed over its experts, the two bit fields popcounted."""

    def __init__(
        self, tokens: int, shape: _TableShape, nodes: int, codes: np.ndarray, per_layer: bool
    ) -> None:
        self.shape, self.nodes, self.per_layer = shape, nodes, per_layer
        self.node_mask = codes.dtype.type((1 << nodes) - 1)
        self.node_tok = np.zeros(tokens, dtype=np.int64)
        self.intra_tok = np.zeros(tokens, dtype=np.int64)
        cells = shape.ranks * shape.layers if per_layer else 0
        self.rank_layer_node = np.zeros(cells)
        self.rank_layer_intra = np.zeros(cells)
        self.token_layers = 0

    def add(self, start: int, ids: np.ndarray, rank_chunk: np.ndarray, code: np.ndarray) -> None:
        """One chunk of tokens from ``start``: ``code [tokens, layers, top_k]``."""
        merged = code[:, :, 0].copy()
        for k in range(1, code.shape[2]):
            merged |= code[:, :, k]
        node_tl = np.bitwise_count(merged & self.node_mask)  # [tokens, layers]
        intra_tl = np.bitwise_count(merged >> self.nodes)
        self.node_tok[start : start + len(ids)] = node_tl.sum(1)
        self.intra_tok[start : start + len(ids)] = intra_tl.sum(1)
        self.token_layers += int(np.count_nonzero(ids.max(axis=2) >= 0))
        if self.per_layer:
            layers, size = self.shape.layers, self.shape.ranks * self.shape.layers
            cell = (rank_chunk[:, None] * layers + np.arange(layers, dtype=np.int32)).ravel()
            self.rank_layer_node += np.bincount(cell, weights=node_tl.ravel(), minlength=size)
            self.rank_layer_intra += np.bincount(cell, weights=intra_tl.ravel(), minlength=size)

    def per_rank_layer(self, values: np.ndarray) -> np.ndarray | None:
        if not self.per_layer:
            return None
        return values.reshape(self.shape.ranks, self.shape.layers).astype(np.int64)


class _TableStats:
    """Remote hits and GPU loads from one bincount of the table indices: O(table) at the
    end, the faster path when there are more routing events than table cells."""

    def __init__(self, shape: _TableShape, dest_gpu: np.ndarray, per_node: int) -> None:
        self.shape, self.dest_gpu, self.per_node = shape, dest_gpu, per_node
        self.counts = np.zeros(shape.size, dtype=np.int64)

    def add(
        self, ids: np.ndarray, idx: np.ndarray, code: np.ndarray, rank_chunk: np.ndarray
    ) -> None:
        self.counts += np.bincount(idx.ravel(), minlength=self.shape.size)

    def totals(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rank_remote_hits [ranks], gpu_load [layers, gpus], served cells)."""
        ranks, layers, experts = self.shape.ranks, self.shape.layers, self.shape.experts
        dest_gpu, per_node = self.dest_gpu, self.per_node
        counts3 = self.counts.reshape(ranks, layers, self.shape.width)[:, :, 1:]
        rank_node = np.arange(ranks) // per_node
        remote = (dest_gpu // per_node) != rank_node[:, None, None]
        rank_remote_hits = (counts3 * remote).sum(axis=(1, 2))
        gpu_index = np.arange(layers)[None, :, None] * ranks + dest_gpu
        gpu_load = np.bincount(
            gpu_index.ravel(), weights=counts3.ravel(), minlength=layers * ranks
        ).astype(np.int64)
        reached = counts3 > 0
        served = gpu_index[reached] * experts + np.nonzero(reached)[2]
        return rank_remote_hits, gpu_load.reshape(layers, ranks), served


class _EventStats:
    """Remote hits and GPU loads event by event: O(events), the faster path for small
    batches (fewer routing events than table cells, e.g. one simulator step)."""

    def __init__(self, shape: _TableShape, dest_gpu: np.ndarray, node_mask: np.integer) -> None:
        self.shape, self.flat_dest, self.node_mask = shape, dest_gpu.ravel(), node_mask
        self.rank_remote_hits = np.zeros(shape.ranks, dtype=np.int64)
        self.gpu_load = np.zeros(shape.layers * shape.ranks, dtype=np.int64)
        self.served: list[np.ndarray] = []  # (layer, gpu, expert) cells reached

    def add(
        self, ids: np.ndarray, idx: np.ndarray, code: np.ndarray, rank_chunk: np.ndarray
    ) -> None:
        """Adds one chunk's remote hits per rank and (layer, GPU) loads, and keeps the
        (layer, GPU, expert) cells its events reach, as ``cell * experts + e``.

        ``idx`` indexes the [ranks, layers, experts + 1] code table (``code`` its
        entries); the same event in
        the [ranks, layers, experts] dispatch table is ``idx - rank * layers - layer - 1``.
        """
        layers, ranks = self.shape.layers, self.shape.ranks
        valid = ids >= 0
        remote = ((code & self.node_mask) != 0) & valid
        per_token = remote.sum(axis=(1, 2))
        self.rank_remote_hits += np.bincount(rank_chunk, weights=per_token, minlength=ranks).astype(
            np.int64
        )
        layer = np.arange(layers, dtype=np.int32)[None, :, None]
        dest_index = idx - rank_chunk[:, None, None] * layers - layer - 1
        dest = self.flat_dest.take(dest_index[valid])
        cell = (np.broadcast_to(layer, ids.shape)[valid] * ranks + dest).astype(np.int64)
        self.gpu_load += np.bincount(cell, minlength=self.gpu_load.size)
        self.served.append(cell * self.shape.experts + ids[valid])

    def totals(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rank_remote_hits [ranks], gpu_load [layers, gpus], served cells)."""
        served = np.concatenate(self.served) if self.served else np.zeros(0, np.int64)
        gpu_load = self.gpu_load.reshape(self.shape.layers, self.shape.ranks)
        return self.rank_remote_hits, gpu_load, served


def _assemble(
    copies: _Copies,
    rank_remote_hits: np.ndarray,
    gpu_load: np.ndarray,
    served: np.ndarray,
    shape: _TableShape,
    model: ModelShape,
    ranks: np.ndarray,
    steps: np.ndarray | None,
    fp8_scales: bool,
) -> Accounting:
    """The :class:`Accounting` of the per-token copies and the counted stats."""
    num_ranks = shape.ranks
    size = bytes_per_copy(model.hidden_size, fp8_scales)
    rank_node_copies = np.bincount(ranks, weights=copies.node_tok, minlength=num_ranks)
    rank_intra_copies = np.bincount(ranks, weights=copies.intra_tok, minlength=num_ranks)
    rank_node_copies = rank_node_copies.astype(np.int64)
    rank_intra_copies = rank_intra_copies.astype(np.int64)
    step_traffic = None
    if steps is not None:
        step_traffic = _step_traffic(
            steps, ranks, copies.node_tok, copies.intra_tok, num_ranks, size.total
        )
    return Accounting(
        token_layers=copies.token_layers,
        remote_hits=int(rank_remote_hits.sum()),
        node_copies=int(copies.node_tok.sum()),
        intra_node_copies=int(copies.intra_tok.sum()),
        bytes_per_copy=size,
        rank_tokens=np.bincount(ranks, minlength=num_ranks),
        rank_remote_hits=rank_remote_hits,
        rank_node_copies=rank_node_copies,
        rank_intra_node_copies=rank_intra_copies,
        rank_inter_node_bytes=rank_node_copies * size.total,
        rank_intra_node_bytes=rank_intra_copies * size.total,
        gpu_load=gpu_load,
        gpu_load_imbalance=max_over_mean(gpu_load),
        served_cells=served,
        num_experts=shape.experts,
        steps=step_traffic,
        rank_layer_node_copies=copies.per_rank_layer(copies.rank_layer_node),
        rank_layer_intra_node_copies=copies.per_rank_layer(copies.rank_layer_intra),
    )


def _step_traffic(
    steps: np.ndarray,
    ranks: np.ndarray,
    node_copies_tok: np.ndarray,
    intra_copies_tok: np.ndarray,
    num_ranks: int,
    bytes_total: int,
) -> StepTraffic:
    step_ids, step_of = np.unique(steps, return_inverse=True)
    cell = step_of.astype(np.int64) * num_ranks + ranks
    size = step_ids.size * num_ranks
    inter = np.bincount(cell, weights=node_copies_tok, minlength=size).astype(np.int64)
    intra = np.bincount(cell, weights=intra_copies_tok, minlength=size).astype(np.int64)
    inter = inter.reshape(-1, num_ranks) * bytes_total
    intra = intra.reshape(-1, num_ranks) * bytes_total
    return StepTraffic(step_ids, inter, inter.max(axis=1), intra, intra.max(axis=1))


def _check(
    placement: Placement,
    topology: Topology,
    model: ModelShape,
    ranks: np.ndarray,
    token_ids: np.ndarray,
    steps: np.ndarray | None,
) -> None:
    """Shapes and ranges; errors name the argument and what it should be."""
    if (topology.nodes, topology.gpus_per_node) != (placement.num_nodes, placement.gpus_per_node):
        raise ValueError(
            f"topology {topology.nodes}x{topology.gpus_per_node} does not match the "
            f"placement's {placement.num_nodes}x{placement.gpus_per_node} GPUs"
        )
    if model.num_experts != placement.num_experts:
        raise ValueError(
            f"model has {model.num_experts} experts, placement {placement.num_experts}"
        )
    if token_ids.ndim != 3 or token_ids.shape[1] != placement.num_layers:
        raise ValueError(
            f"token_ids must be [tokens, {placement.num_layers} layers, top_k], "
            f"got shape {token_ids.shape}"
        )
    if not np.issubdtype(token_ids.dtype, np.integer):
        raise ValueError(f"token_ids must be integers, got {token_ids.dtype}")
    if token_ids.size and (token_ids.min() < -1 or token_ids.max() >= placement.num_experts):
        raise ValueError(f"token_ids must lie in [-1, {placement.num_experts})")
    if ranks.shape != token_ids.shape[:1] or not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"ranks must be [{token_ids.shape[0]}] integers, got {ranks.shape}")
    if ranks.size and (ranks.min() < 0 or ranks.max() >= placement.num_gpus):
        raise ValueError(f"ranks must lie in [0, {placement.num_gpus})")
    if steps is not None and (
        steps.shape != ranks.shape or not np.issubdtype(steps.dtype, np.integer)
    ):
        raise ValueError(f"steps must be [{ranks.shape[0]}] integers, got {steps.shape}")
