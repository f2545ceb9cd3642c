"""Request routing policies: which DP rank serves each request.

Pure: no network code, no environment, no file I/O; the simulator and the gRPC server
share these. Policies are chosen by name from :data:`POLICIES` with :func:`make_policy`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from scheduler.errors import ConfigError
from scheduler.policies.admission import Admission, PolicyContractError
from scheduler.policies.base import RankState, RequestInfo, RoutingPolicy
from scheduler.policies.builtin import ClassAffinity, LocalityBand, RoundRobin, TotalRequests
from scheduler.policies.window import LocalityWindow

if TYPE_CHECKING:
    from scheduler.placement.placement import Placement

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


def make_policy(
    name: str,
    *,
    placement: Placement | None = None,
    class_to_node_share: Mapping[str, Sequence[float]] | None = None,
    band: float | None = None,
    balance: float | None = None,
    weight: str = "decode",
) -> RoutingPolicy:
    """A new policy ``name``, given whichever of these facts it takes (the facts a caller
    has; the others are ignored): ``class_affinity`` needs ``class_to_node_share``,
    ``locality_band`` the ``placement`` (and ``band``), ``locality_window`` the
    ``placement`` (and ``balance``, ``weight``). ConfigError names the choices, a missing
    fact or a bad value."""
    if name not in POLICIES:
        raise ConfigError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICIES)}")

    def need(value: Any, what: str) -> Any:
        if value is None:
            raise ConfigError(f"routing policy {name!r} needs {what}")
        return value

    try:
        if name == "class_affinity":
            return ClassAffinity(need(class_to_node_share, "the plan's class_to_node_share"))
        if name == "locality_band":
            return LocalityBand(need(placement, "the placement"), *([] if band is None else [band]))
        if name == "locality_window":
            extra = {} if balance is None else {"balance": balance}
            return LocalityWindow(need(placement, "the placement"), weight=weight, **extra)
        return POLICIES[name][0]()
    except ValueError as e:
        raise ConfigError(f"routing policy {name!r}: {e}") from e


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
