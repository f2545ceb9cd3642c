"""One module per benchmark renders its RESULTS.md section from the result JSON."""

from __future__ import annotations

from benchmarks.renderers.accounting import render_accounting
from benchmarks.renderers.common import Renderer
from benchmarks.renderers.dataplane import render_dataplane
from benchmarks.renderers.emulator import render_emulator
from benchmarks.renderers.frontend import render_frontend
from benchmarks.renderers.placement import render_placement
from benchmarks.renderers.policy_grid import render_policy_grid
from benchmarks.renderers.policy_grid_production import render_policy_grid_production
from benchmarks.renderers.predictors import render_predictors
from benchmarks.renderers.predictors_text_routing import render_predictors_text_routing
from benchmarks.renderers.profile_scale import render_profile_scale

#: Benchmark name (the result's ``"benchmark"`` key) -> section renderer.
RENDERERS: dict[str, Renderer] = {
    "profile_scale": render_profile_scale,
    "emulator": render_emulator,
    "predictors": render_predictors,
    "predictors_text_routing": render_predictors_text_routing,
    "placement": render_placement,
    "accounting": render_accounting,
    "policy_grid": render_policy_grid,
    "policy_grid_production": render_policy_grid_production,
    "frontend": render_frontend,
    "dataplane": render_dataplane,
}
