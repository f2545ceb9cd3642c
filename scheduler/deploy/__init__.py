"""Deployment helpers: the SGLang launch commands that match a placement, and the
container health probe.

:mod:`~scheduler.deploy.sglang_args` is pure (values in, argv lists and text out; no
files, no environment); the file reading lives in :mod:`~scheduler.deploy.cli`. The
container image, compose files, Kubernetes manifests and dashboards are in ``deploy/``.
"""
