"""A GPU-less stand-in for a multi-node SGLang cluster, speaking SGLang's HTTP API.

It serves the subset of SGLang's API the middleware uses (``/generate`` with
``routed_dp_rank`` and ``return_routed_experts``, ``/health``, ``/server_info``,
``/v1/loads``) over real sockets, for N x G emulated DP-attention ranks. Nothing here runs
a model: each request's routed experts are DRAWN from a real per-class routing profile,
and its latency comes from the project's cost model and dispatch model
(``scheduler.accounting``) over its class's expected traffic. See ``docs/emulator.md``.

Purity by module: ``routing`` and ``timing`` are pure; ``expert_location`` and
``workload`` are pure apart from their file readers; ``ranks`` holds asyncio bookkeeping
but no I/O; ``core`` turns request bodies into responses without sockets; only ``app``
(aiohttp) and ``cli`` touch the network, signals and the environment.
``default_profile`` regenerates the shipped fallback profile ``data/default_profile.json``.
"""
