"""A GPU-less stand-in for a multi-node SGLang cluster, speaking SGLang's HTTP API.

It serves the subset of SGLang's API the middleware uses (``/generate`` with
``routed_dp_rank`` and ``return_routed_experts``, ``/health``, ``/ready``,
``/server_info``, ``/model_info``, ``/v1/models``, ``/v1/loads``) over real sockets, for
N x G emulated DP-attention ranks, as a chosen SGLang version reads the requests, in a PD
role (mixed, prefill with a bootstrap server, decode), failing as SGLang fails (the
whole instance dies). Nothing here runs a model: each request's routed experts are DRAWN
from a real per-class routing profile, and its latency comes from the project's cost
model and dispatch model (``scheduler.accounting``) over its class's expected traffic.
See ``docs/emulator.md``.

Purity by module: ``routing``, ``timing``, ``generate_request`` (a body as a version
reads it), ``info`` (/server_info, /model_info) and ``request_log`` are pure;
``expert_location`` and ``workload`` are pure apart from their file readers; ``ranks``
and ``kv_rooms`` (PD room pairing) hold asyncio bookkeeping but no I/O; ``core`` turns
request bodies into responses without sockets; only ``app``, ``admin``, ``web_common``,
``bootstrap`` (the prefill's bootstrap server and the decode's client), ``instance`` (an
instance's death), ``server`` (binding, deaths and restarts) and ``cli`` touch the
network, signals and the environment.
``default_profile`` regenerates the shipped fallback profile ``data/default_profile.json``.
"""
