"""Tests of the host input benchmark (detco_jax/benchmark/input_pipeline.py)."""

import pytest

from detco_jax.benchmark import input_pipeline
from detco_jax.benchmark import photos


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  directory = tmp_path_factory.mktemp("photos")
  summary = photos.write_folder(str(directory), 12)
  assert summary.count == 12
  return str(directory)


def test_measure_reads_the_photographs_at_imagenet_view_sizes(folder):
  config = input_pipeline.imagenet_config(folder, 4)
  assert config.views.global_size == 224 and config.views.patch_size == 64
  rates = input_pipeline.measure(config, one_thread=True, warmup=1, windows=2,
                                 window_batches=1)
  assert rates["wall"] > 0 and rates["cpu"] > 0
  assert input_pipeline.imagenet_config(folder, 4,
                                        antialias=True).views.antialias


def test_breakdown_stages_are_cumulative_and_in_pipeline_order(folder):
  rows = input_pipeline.breakdown(input_pipeline.imagenet_config(folder, 4),
                                  windows=1, samples=8)
  names = [name for name, _ in rows]
  assert names[0].startswith("decode") and names[-1].startswith("+ numpy")
  assert [n.split()[1] for n in names[1:4]] == ["2", "2", "batches"]
  cumulative = [ms for _, ms in rows]
  assert all(ms > 0 for ms in cumulative)
  # Decoding a ~100 KB JPEG and cutting 20 images from it each take time:
  # the views stages cost more than decoding alone.
  assert cumulative[2] > cumulative[0]
