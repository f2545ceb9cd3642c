"""Container health probe: ask a gRPC server's ``grpc.health.v1`` service for a status.

``python -m scheduler.deploy.healthcheck [HOST:PORT] [--service NAME]`` exits 0 when the
service reports SERVING and 1 otherwise (NOT_SERVING, unknown service, unreachable); it
prints the status. The Dockerfile's HEALTHCHECK uses it; Kubernetes uses its native
``grpc:`` probe instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

#: The scheduler's gRPC service, as registered with the health service (docs/server.md).
SCHEDULER_SERVICE = "moe_scheduler.v1.Scheduler"


def health_status(target: str, service: str = SCHEDULER_SERVICE, timeout_s: float = 2.0) -> str:
    """The status name (``SERVING``, ``NOT_SERVING``, ...) that ``target`` reports for
    ``service``, or the gRPC code when the call fails (``NOT_FOUND``: unknown service,
    ``UNAVAILABLE``: nothing listening, ``DEADLINE_EXCEEDED``)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as e:
            code = e.code() if isinstance(e, grpc.Call) else None
            return f"failed: {code.name if code is not None else e}"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scheduler.deploy.healthcheck",
        description="Exit 0 if the gRPC health service reports SERVING, else 1.",
    )
    parser.add_argument("target", nargs="?", default="127.0.0.1:50051", help="HOST:PORT")
    parser.add_argument(
        "--service", default=SCHEDULER_SERVICE, help=f"(default {SCHEDULER_SERVICE})"
    )
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")
    args = parser.parse_args(argv)
    status = health_status(args.target, args.service, args.timeout)
    print(f"{args.target} {args.service or '(server)'}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
