"""One module per benchmark renders its RESULTS.md section from the result JSON."""

from __future__ import annotations

from renderers.accounting import render_accounting
from renderers.common import Renderer
from renderers.dataplane import render_dataplane
from renderers.emulator import render_emulator
from renderers.frontend import render_frontend
from renderers.placement import render_placement
from renderers.policy_grid import render_policy_grid
from renderers.policy_grid_production import render_policy_grid_production
from renderers.predictors import render_predictors
from renderers.predictors_text_routing import render_predictors_text_routing
from renderers.profile_scale import render_profile_scale

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
