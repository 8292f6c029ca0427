"""Workflows built on the library: the synthetic-data demo (`examples.demo`, ``make demo``).

They live outside ``fss_jax`` because they use the top-level ``configs`` and ``data_prep``
packages, which the library never imports.
"""
