"""Activation analysis: load imbalance, domain specificity, prefill-decode correlation,
co-activation. :mod:`~scheduler.analysis.stats` is pure numpy/scikit-learn;
:mod:`~scheduler.analysis.collect` streams traces into those statistics;
:mod:`~scheduler.analysis.report` renders Markdown and PNG figures.
"""
