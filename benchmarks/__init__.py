"""The benchmarks: each module writes ``benchmarks/results/NAME.json``;
``python -m benchmarks.render`` turns them into ``benchmarks/RESULTS.md``.

Run them as modules from the repository root (``python -m benchmarks.dataplane --data
../shared/data``; ``make bench`` runs them all). :mod:`benchmarks.harness` holds what the
server benchmarks share: the cached setup, starting and stopping the emulator, scheduler
and router processes, /proc measurements and the load generators.
"""
