"""Request routing policies: which DP rank serves each request.

Pure: no network code, no environment, no file I/O; the simulator and the gRPC server
share these. Policies are chosen by name from :data:`POLICIES` with :func:`make_policy`.
"""

from __future__ import annotations

from typing import Any

from scheduler.errors import ConfigError
from scheduler.policies.admission import Admission, PolicyContractError
from scheduler.policies.base import RankState, RequestInfo, RoutingPolicy
from scheduler.policies.builtin import ClassAffinity, LocalityBand, RoundRobin, TotalRequests
from scheduler.policies.window import LocalityWindow

#: name -> (policy class, one-line description).
POLICIES: dict[str, tuple[type[RoutingPolicy], str]] = {
    "round_robin": (RoundRobin, "ranks in turn, skipping full ones (SGLang default)"),
    "total_requests": (TotalRequests, "fewest running + waiting requests (SGLang)"),
    "class_affinity": (
        ClassAffinity,
        "the class's nodes by the plan's class_to_node_share, least-loaded rank there "
        "(paper B; needs class_to_node_share)",
    ),
    "locality_band": (
        LocalityBand,
        "least-loaded rank among nodes within a band of the best expected locality "
        "(ELDR; needs placement, optional band)",
    ),
    "locality_window": (
        LocalityWindow,
        "ours: each window's requests to ranks, keeping the busiest rank's predicted "
        "inter-node traffic per MoE layer low, under capacity and a load cap (needs "
        "placement, optional balance)",
    ),
}


def make_policy(name: str, **params: Any) -> RoutingPolicy:
    """A new policy ``name`` built with ``params``; ConfigError names the choices or the
    bad parameter."""
    if name not in POLICIES:
        raise ConfigError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICIES)}")
    cls = POLICIES[name][0]
    try:
        return cls(**params)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"routing policy {name!r}: {e}") from None


__all__ = [
    "POLICIES",
    "Admission",
    "ClassAffinity",
    "LocalityBand",
    "LocalityWindow",
    "PolicyContractError",
    "RankState",
    "RequestInfo",
    "RoundRobin",
    "RoutingPolicy",
    "TotalRequests",
    "make_policy",
]
