"""The step compiles once and makes no implicit transfer; the benchmarks run."""

import functools
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import detco as detco_config
from configs import detection as detection_config
from detco_jax import config_lib
from detco_jax import sharding
from detco_jax import step as step_lib
from detco_jax.benchmark import common
from detco_jax.benchmark import detection_step
from detco_jax.benchmark import train_step as benchmark
from test_step import random_batch, setup, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Figures every benchmark run prints on CPU (other backends may lack some
# memory fields).
FIGURES = (
    "compile_s", "flops_per_step", "memory_arguments_bytes",
    "memory_outputs_bytes", "memory_aliased_bytes", "memory_temp_bytes",
    "memory_total_bytes", "step_s", "images_per_s_per_device",
    "peak_flops_per_s", "achieved_flops_per_s", "mfu", "backbone_s",
    "overhead_ratio", "flops_ratio",
)


@pytest.mark.long
def test_step_traces_once_and_runs_under_transfer_guard(monkeypatch):
  traces = []
  traced_step = step_lib.train_step

  # Same name, hence the same program and compilation-cache entry as the
  # benchmark's step below.
  @functools.wraps(traced_step)
  def counting_step(*args, **kwargs):
    traces.append(1)  # Runs only while jax traces the step.
    return traced_step(*args, **kwargs)

  # `make_train_step` (inside `setup`) binds the module's `train_step`.
  monkeypatch.setattr(step_lib, "train_step", counting_step)
  config = tiny_config()
  mesh, _, state, step = setup(config)
  rng = jax.device_put(jax.random.key(1), sharding.replicated(mesh))
  losses = []
  for i in range(4):
    # The only host-to-device copy, explicit and outside the guard.
    batch = sharding.host_to_global(random_batch(config, seed=i), mesh)
    with jax.transfer_guard("disallow"):
      state, metrics = step(state, batch, rng)
    losses.append(metrics["loss"])
  assert len(traces) == 1
  assert step._cache_size() == 1  # pylint: disable=protected-access
  assert int(jax.device_get(state.step)) == 4
  assert np.all(np.isfinite(jax.device_get(losses)))


@pytest.mark.long
def test_benchmark_command_prints_every_figure():
  # Views as in `tiny_config`, so the step is the one compiled above (the
  # tests' persistent compilation cache may then serve it).
  command = [
      sys.executable, "-m", "detco_jax.benchmark",
      "--config=configs/detco.py:tiny", "--config.views.global_size=16",
      "--config.views.local_size=24", "--config.views.patch_size=8",
      "--steps=3", "--warmup=1"]
  result = subprocess.run(command, cwd=REPO, env=dict(os.environ),
                          capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  stdout = result.stdout
  figures = {name: float(value) for name, value in re.findall(
      r"^(\w+): (\S+)$", stdout, re.MULTILINE)}
  missing = [name for name in FIGURES if name not in figures]
  assert not missing, (missing, stdout)
  assert all(np.isfinite(v) and v >= 0 for v in figures.values()), figures
  assert figures["images_per_s_per_device"] > 0
  assert 0 < figures["mfu"] < 1.5
  assert figures["overhead_ratio"] > 0
  # The full step does all the backbone's work and more.
  assert figures["flops_ratio"] >= 1
  assert figures["memory_total_bytes"] > figures["memory_temp_bytes"] > 0
  # 8 fake devices x 2 images: batch and queue untouched, sizes as asked.
  assert "devices: 8 x cpu" in stdout
  assert "global batch: 16 (2 per device)" in stdout


@pytest.mark.long
def test_step_work_is_split_over_devices():
  """Per-device FLOPs near the backbone's: nothing runs replicated.

  Guards the shuffle-BN gather: without a sharding constraint on its
  result, XLA ran the key encoder on the whole batch on every device
  (2.8x the backbone's FLOPs per device on 8 devices).
  """
  config = tiny_config()
  mesh = sharding.make_mesh()
  model = config_lib.build_model(config)
  tx, schedule = config_lib.build_optimizer(config)
  _, _, figures = benchmark.compile_step(config, model, tx, schedule, mesh,
                                         log=lambda line: None)
  state, _ = benchmark.abstract_state(config, model, tx, mesh)
  views = {k: jax.ShapeDtypeStruct(shape, jnp.float32,
                                   sharding=sharding.batch_sharded(mesh))
           for k, shape in benchmark.batch_shapes(config).items()}
  backbone = benchmark.make_backbone_step(model, mesh).lower(
      *benchmark.backbone_args(state, views)).compile()
  # On one device, heads, loss and updates add about 3% to the backbone.
  ratio = figures["flops_per_step"] / common.compiled_flops(backbone)
  assert ratio < 1.3, ratio



def run_benchmark(*flags_):
  """`python -m detco_jax.benchmark FLAGS` from the repository root."""
  return subprocess.run([sys.executable, "-m", "detco_jax.benchmark",
                         *flags_], cwd=REPO, env=dict(os.environ),
                        capture_output=True, text=True, timeout=300,
                        check=False)


@pytest.mark.long
def test_compare_times_two_configs_side_by_side():
  result = run_benchmark("--config=configs/detco.py:tiny",
                         "--compare=configs/detco.py:tiny,mocov2",
                         "--steps=3", "--warmup=1")
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  # Each config's figures under its label, then the table and the ratio.
  blocks = dict(re.findall(r"^== (\S+)\n((?:\w+: \S+\n)+)", out,
                           re.MULTILINE))
  assert set(blocks) == {"configs/detco.py:tiny",
                         "configs/detco.py:tiny,mocov2"}, out
  figures = {label: {k: float(v) for k, v in re.findall(
      r"^(\w+): (\S+)$", text, re.MULTILINE)}
             for label, text in blocks.items()}
  detco, mocov2 = (figures[k] for k in blocks)
  for figs in (detco, mocov2):
    assert figs["step_s"] > 0 and 0 < figs["mfu"] < 1.5, figs
  # DetCo's step does more work than MoCo v2's on the same batch.
  assert detco["flops_per_step"] > mocov2["flops_per_step"]
  ratio = mocov2["time_per_image_ratio"]
  # Same batch: ratios of the step's figures (printed to 4 digits).
  np.testing.assert_allclose(ratio, detco["step_s"] / mocov2["step_s"],
                             rtol=2e-3)
  np.testing.assert_allclose(
      mocov2["flops_per_image_ratio"],
      detco["flops_per_step"] / mocov2["flops_per_step"], rtol=2e-3)
  assert re.search(
      r"^configs/detco.py:tiny takes [\d.]+x the time per image of "
      r"configs/detco.py:tiny,mocov2 \(paired: [\d.]+x\), for [\d.]+x its "
      r"FLOPs per image\.$", out, re.MULTILINE), out
  rows = [line for line in out.splitlines()
          if line.endswith(("  configs/detco.py:tiny",
                            "  configs/detco.py:tiny,mocov2"))]
  assert len(rows) == 2, out



def test_side_by_side_lists_each_config_then_the_ratios():
  base = {"flops_per_step": 4e9, "step_s": 1.0,
          "images_per_s_per_device": 64.0, "mfu": 0.3}
  other = dict(base, flops_per_step=2e9, step_s=0.5,
               images_per_s_per_device=128.0, time_per_image_ratio=2.0,
               time_per_image_ratio_paired=1.9, flops_per_image_ratio=2.0)
  lines = benchmark.side_by_side({"a.py:x": base, "a.py:y": other}, 10)
  assert lines[0] == "== a.py:x" and "step_s: 1" in lines
  assert lines.index("== a.py:y") > lines.index("step_s: 1")
  table = lines.index("side by side, medians of 10 rounds in turn:")
  assert lines[table + 2].split() == ["4.00", "1.000", "64.0", "0.300",
                                      "a.py:x"]
  assert lines[table + 3].split()[-1] == "a.py:y"
  assert lines[-1] == ("a.py:x takes 2.00x the time per image of a.py:y "
                       "(paired: 1.90x), for 2.00x its FLOPs per image.")

@pytest.mark.long
def test_compare_refuses_bad_flags_in_one_line():
  result = run_benchmark("--config=configs/detco.py:tiny",
                         "--compare=configs/nothere.py:tiny")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith(
      "Error: "), result.stderr[-2000:]
  assert "nothere.py" in result.stderr
  result = run_benchmark("--config=configs/detco.py:tiny", "--breakdown",
                         "--compare=configs/detco.py:tiny,mocov2")
  assert result.returncode == 1
  assert "drop --compile_only, --breakdown" in result.stderr


def test_fit_config_sets_batch_queue_and_bn_groups():
  config = tiny_config()
  config.queue_size, config.bn_groups = 100, 4
  changes = benchmark.fit_config(config, per_device_batch=3, num_devices=2)
  assert config.batch_size == 6
  assert config.queue_size == 102
  assert config.bn_groups == 3
  assert len(changes) == 3


def test_fit_config_fits_bn_group_size_when_set():
  """With `bn_group_size` (`batch=N`), the group size is what must fit."""
  config = tiny_config()
  config.queue_size, config.bn_group_size = 96, 32
  assert benchmark.fit_config(config, per_device_batch=16,
                              num_devices=2) == ["batch_size 16 -> 32"]
  assert config_lib.bn_groups(config) == 1
  benchmark.fit_config(config, per_device_batch=12, num_devices=2)
  assert (config.bn_group_size, config_lib.bn_groups(config)) == (24, 1)
  benchmark.fit_config(config, per_device_batch=20, num_devices=2)
  assert (config.bn_group_size, config_lib.bn_groups(config)) == (20, 2)


class _FakeCompiled:
  """Stands in for `jax.stages.Compiled` with given analysis results."""

  def __init__(self, cost, memory=None):
    self._cost, self._memory = cost, memory

  def cost_analysis(self):
    return self._cost

  def memory_analysis(self):
    return self._memory


def test_cost_and_memory_analysis_across_return_types():
  assert common.compiled_flops(_FakeCompiled({"flops": 5.0})) == 5.0
  assert common.compiled_flops(_FakeCompiled([{"flops": 7.0}])) == 7.0
  assert common.compiled_flops(_FakeCompiled(None)) is None
  assert common.compiled_flops(
      _FakeCompiled([{"bytes accessed": 1.0}])) is None
  assert common.compiled_memory(_FakeCompiled(None, None)) == {}
  compiled = jax.jit(lambda x: jnp.tanh(x) @ x, donate_argnums=0).lower(
      jnp.ones((64, 64))).compile()
  mem = common.compiled_memory(compiled)
  assert mem["arguments"] == mem["outputs"] == 64 * 64 * 4
  assert mem["total"] == (mem["arguments"] + mem["outputs"] + mem["temp"]
                          - mem["aliased"])
  assert common.compiled_flops(compiled) >= 2 * 64**3


def test_donation_failures_are_reported():
  jitted = jax.jit(lambda x: x.sum(), donate_argnums=0)  # Nothing to reuse.
  _, _, caught = common.compile_with_warnings(jitted, jnp.ones((8, 8)))
  assert any("donated" in message for message in caught), caught


def test_topology_needs_compile_only():
  # Compile-only TPU devices cannot run anything: refused before any work.
  with pytest.raises(ValueError, match="compile_only"):
    benchmark.run(tiny_config(), per_device_batch=2, steps=1, warmup=0,
                  topology="v3:2x2", log=lambda line: None)


def test_memory_for_a_tpu_topology_compiles_on_any_host():
  pytest.importorskip("libtpu")
  lines = []
  figures = benchmark.run(tiny_config(), per_device_batch=2, steps=1,
                          warmup=0, compile_only=True, topology="v3:2x2",
                          log=lines.append)
  assert "devices: 8 x tpu (TPU v3)" in lines
  assert figures["memory_temp_bytes"] > 0
  assert figures["flops_per_step"] > 0


# Figures every detection benchmark run prints on CPU, and those of
# --compile_only.
DETECTION_FIGURES = (
    "compile_s", "flops_per_step", "memory_arguments_bytes",
    "memory_outputs_bytes", "memory_aliased_bytes", "memory_temp_bytes",
    "memory_total_bytes", "step_s", "step_s_min", "step_s_max",
    "images_per_s_per_device", "peak_flops_per_s", "achieved_flops_per_s",
    "mfu",
)
COMPILE_FIGURES = DETECTION_FIGURES[:7]


def real_detection_step_flops(config, pretrain_config) -> float:
  """FLOPs of the job's step compiled on a real state and batch.

  The state is the job's (`detection.create_state` on `random_init`), the
  batch zeros of the job's shapes: the benchmark compiles for abstract ones.
  """
  config = config.copy_and_resolve_references()
  mesh = sharding.make_mesh()
  setup = detection_step.build(config, pretrain_config, mesh, classes=10)
  b, g = config.batch_size, config.data.max_boxes
  h, w = setup.shape
  batch = sharding.host_to_global(
      {"image": np.zeros((b, h, w, 3), np.uint8),
       "boxes": np.zeros((b, g, 4), np.float32),
       "labels": np.full((b, g), -1, np.int32),
       "valid": np.zeros((b, g), bool)}, mesh)
  state = detection_step.create_state(setup)
  return common.compiled_flops(
      setup.train_step.lower(state, batch).compile())


@pytest.mark.long
def test_detection_benchmark_times_the_jobs_step():
  config = detection_config.get_config("tiny")
  pretrain_config = detco_config.get_config("tiny")
  lines = []
  # 8 fake devices x 1 image: the tiny config's batch of 8.
  figures = detection_step.run(config, pretrain_config, per_device_batch=1,
                               steps=2, warmup=1, log=lines.append)
  missing = [name for name in DETECTION_FIGURES if name not in figures]
  assert not missing, (missing, lines)
  assert all(np.isfinite(v) and v >= 0 for v in figures.values()), figures
  assert figures["step_s_min"] <= figures["step_s"] <= figures["step_s_max"]
  assert figures["images_per_s_per_device"] > 0
  assert 0 < figures["mfu"] < 1.5
  assert figures["memory_total_bytes"] > figures["memory_temp_bytes"] > 0
  assert figures["memory_arguments_bytes"] > 0
  assert figures["memory_outputs_bytes"] > 0
  assert "devices: 8 x cpu (cpu)" in lines
  assert any(line.startswith("global batch: 8 (1 per device); images 32x32 "
                             "px (shortest_edge)") for line in lines), lines
  # The printed figures are what the run returned.
  assert f"flops_per_step: {int(figures['flops_per_step'])}" in lines
  # What was measured is the step compiled at the job's shapes.
  assert figures["flops_per_step"] > 0
  assert figures["flops_per_step"] == real_detection_step_flops(
      config, pretrain_config)


@pytest.mark.long
def test_detection_compile_only_allocates_and_runs_nothing(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("--compile_only made or ran something")

  monkeypatch.setattr(detection_step, "create_state", refuse)
  monkeypatch.setattr(detection_step, "synthetic_batch", refuse)
  monkeypatch.setattr(common, "time_step", refuse)
  figures = detection_step.run(
      detection_config.get_config("tiny"), detco_config.get_config("tiny"),
      per_device_batch=1, steps=1, warmup=0, compile_only=True,
      log=lambda line: None)
  assert list(figures)[:len(COMPILE_FIGURES)] == list(COMPILE_FIGURES)
  assert figures["flops_per_step"] > 0
  assert figures["memory_temp_bytes"] > 0
  assert "step_s" not in figures


@pytest.mark.long
def test_detection_benchmark_command_compiles_only():
  # Its flags and both config files, as a user runs it.
  command = [
      sys.executable, "-m", "detco_jax.benchmark.detection_step",
      "--config=configs/detection.py:tiny",
      "--pretrain_config=configs/detco.py:tiny", "--compile_only"]
  result = subprocess.run(command, cwd=REPO, env=dict(os.environ),
                          capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  printed = dict(re.findall(r"^(\w+): (\S+)$", result.stdout, re.MULTILINE))
  assert set(COMPILE_FIGURES) <= set(printed), result.stdout
  assert "step_s" not in printed
  assert "global batch: 8 (1 per device)" in result.stdout


def test_detection_topology_needs_compile_only():
  with pytest.raises(ValueError, match="compile_only"):
    detection_step.run(
        detection_config.get_config("tiny"), detco_config.get_config("tiny"),
        per_device_batch=1, steps=1, warmup=0, topology="v3:2x2",
        log=lambda line: None)


def test_detection_memory_for_a_tpu_topology_compiles_on_any_host():
  pytest.importorskip("libtpu")
  lines = []
  figures = detection_step.run(
      detection_config.get_config("tiny"), detco_config.get_config("tiny"),
      per_device_batch=1, steps=1, warmup=0, compile_only=True,
      topology="v3:2x2", log=lines.append)
  assert "devices: 8 x tpu (TPU v3)" in lines
  assert figures["memory_temp_bytes"] > 0
  assert figures["flops_per_step"] > 0
