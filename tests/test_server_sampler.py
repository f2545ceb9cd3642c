"""The routed-experts sampler: within its CPU budget, and blind to request size."""

from __future__ import annotations

from scheduler.server.telemetry import RoutedSampler


def test_every_request_without_a_budget_and_a_fixed_share_with_a_fraction() -> None:
    assert all(RoutedSampler(0.0).want(10**9) for _ in range(100))
    half = RoutedSampler(0.0, fraction=0.5)
    assert 400 < sum(half.want(1) for _ in range(1000)) < 600


def test_the_budget_bounds_the_share_and_size_does_not_bias_it() -> None:
    import random

    sampler = RoutedSampler(0.1)
    sampler.cost_per_entry = 1e-9  # 1 ns per id
    draw = random.Random(1)
    sizes = [draw.choice((10_000, 1_000_000)) for _ in range(20_000)]
    asked = {10_000: 0, 1_000_000: 0}
    for size in sizes:  # all at once: a burst far above the budget
        asked[size] += sampler.want(size)
    assert 0 < sampler.asked < 2_000  # 0.1 core cannot pay for ~10 s of accounting
    small, large = (asked[n] / sizes.count(n) for n in (10_000, 1_000_000))
    assert abs(small - large) < 0.3 * max(small, large)  # the same share of each size
