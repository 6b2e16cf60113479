"""Experiment configs: one file per experiment, the shared parts in `common`.

A file is loaded by path (`--config=configs/detco.py:VARIANT`); it imports
`configs.common` as a package, which resolves when the job runs from the
repository root (`python -m detco_jax.main ...`) or with it on `PYTHONPATH`.
"""
