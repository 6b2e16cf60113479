"""Benchmarks of the code that trains.

  train_step      the jitted DetCo step and its phases: speed, FLOPs, MFU,
                  memory, overhead over the backbone alone
                  (`python -m detco_jax.benchmark`);
  input_pipeline  DetCo samples per second through the host input pipeline
                  (`python -m detco_jax.benchmark.input_pipeline`).
"""
