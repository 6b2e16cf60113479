"""Benchmarks of the code that trains.

  train_step      the jitted DetCo step and its phases: speed, FLOPs, MFU,
                  memory, overhead over the backbone alone
                  (`python -m detco_jax.benchmark`);
  detection_step  the jitted RetinaNet fine-tuning step of the detection
                  job: speed, FLOPs, MFU, memory
                  (`python -m detco_jax.benchmark.detection_step`);
  common          what the two step benchmarks share: compilation for
                  abstract arguments, XLA's figures, timing, printing;
  input_pipeline  DetCo samples per second through the host input pipeline
                  (`python -m detco_jax.benchmark.input_pipeline`);
  suite           the three above, the devices and a learning curve in one
                  time-boxed command for a GPU or TPU slot
                  (`python -m detco_jax.benchmark.suite --out=DIR`), with
                  devices (facts, matmul and datasheet peaks), budget (time
                  boxes), curve (its learning curve) and report (suite.json
                  and suite.md).
"""
