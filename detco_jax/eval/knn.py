r"""Weighted kNN classification on frozen features: a cheap quality monitor.

Each test example's res5 feature, centred on the training features' mean
and L2-normalised, votes with its k nearest training features (cosine
similarity s), neighbour i adding exp(s_i / tau) to its label's score (Wu
et al. 2018, the monitor of InstDisc and MoCo ports; k = 200, tau = 0.07).
Train features use the test transform (resize and centre crop), so the
monitor needs no training at all.

On its own:

  python -m detco_jax.eval.knn --config=configs/linear_probe.py:demo \
      --config.pretrained=PRETRAIN_WORKDIR --workdir=DIR

(`--config.pretrained` may also be a checkpoint file: docs/checkpoints.md.)
Inside pretraining, `config.knn.every_steps > 0` runs it on the query
backbone every that many steps (see `detco_jax.train`).
"""

from detco_jax import cli  # First: it quiets TensorFlow's import.

if __name__ == "__main__":
  # The flags and the config are checked before JAX and TensorFlow load: the
  # job runs from this module imported again under its own name.
  cli.run_job(
      "detco_jax.eval.knn:run",
      config_help="Probe config, e.g. configs/linear_probe.py:demo.",
      workdir_help="Directory for knn_results.json.",
      report="detco_jax.eval.knn:report",
      precheck="detco_jax.config_checks:check_probe")

# pylint: disable=g-import-not-at-top,wrong-import-order
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from jax.sharding import Mesh

from detco_jax import pretrained
from detco_jax import reporting
from detco_jax import sharding
from detco_jax.data import pipeline
from detco_jax.data import sources
from detco_jax.eval import features
from detco_jax.eval import probe

RESULTS_FILE = "knn_results.json"


def knn_predict(train_features: jax.Array, train_labels: jax.Array,
                test_features: jax.Array, num_classes: int, k: int = 200,
                temperature: float = 0.07) -> jax.Array:
  """Weighted kNN labels of `test_features` (all rows L2-normalised).

  Args:
    train_features: [N, D] unit rows.
    train_labels: [N] int labels in [0, num_classes).
    test_features: [M, D] unit rows.
    num_classes: number of classes.
    k: neighbours per query (capped at N).
    temperature: tau in exp(similarity / tau).

  Returns:
    [M] predicted labels: argmax over classes of the summed weights.
  """
  k = min(k, train_features.shape[0])
  similarity = test_features @ train_features.T
  top_sim, top_index = jax.lax.top_k(similarity, k)
  weights = jnp.exp(top_sim / temperature)
  votes = jax.nn.one_hot(train_labels[top_index], num_classes) * \
      weights[..., None]
  return jnp.argmax(votes.sum(axis=1), axis=-1)


def knn_accuracy(train_features: jax.Array, train_labels: jax.Array,
                 test_features: jax.Array, test_labels: jax.Array,
                 num_classes: int, k: int = 200, temperature: float = 0.07,
                 chunk: int = 1024) -> float:
  """Top-1 accuracy of `knn_predict`, in chunks of test rows (memory).

  Args:
    train_features, train_labels, test_features, num_classes, k,
      temperature: as in `knn_predict`.
    test_labels: [M] true labels.
    chunk: test rows per similarity block.

  Returns:
    The fraction of test rows whose predicted label is right.
  """
  predict = jax.jit(knn_predict, static_argnums=(3, 4))
  correct = 0
  for i in range(0, test_features.shape[0], chunk):
    predicted = predict(train_features, train_labels,
                        test_features[i:i + chunk], num_classes, k,
                        temperature)
    correct += int(jnp.sum(predicted == test_labels[i:i + chunk]))
  return correct / max(test_features.shape[0], 1)


def centre_and_normalize(train_features: jax.Array, test_features: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
  """Both sets centred on the train set's mean, then rows to unit norm.

  Pooled post-ReLU features share a large positive mean, so their raw
  cosine similarities all sit near 1 and the votes' weights barely differ;
  centring first makes the cosine measure how features vary.

  Args:
    train_features: [N, D].
    test_features: [M, D].

  Returns:
    (train [N, D], test [M, D]) unit rows.
  """
  mean = train_features.mean(axis=0)
  return (features.l2_normalize(train_features - mean),
          features.l2_normalize(test_features - mean))


def evaluate(backbone: pretrained.Backbone, config: ml_collections.ConfigDict,
             mesh: Mesh | None = None) -> dict[str, float]:
  """kNN top-1 of a backbone on `config.data` (train subset vs test subset).

  Args:
    backbone: the frozen backbone.
    config: a config with `data` (train/eval splits), `eval_views` and
      `knn` (stage, k, temperature, train_examples, test_examples,
      batch_size); probe and pretraining configs both have them.
    mesh: the device mesh; default all devices.

  Returns:
    {"knn_top1", "num_train", "num_test"}.
  """
  mesh = sharding.make_mesh() if mesh is None else mesh
  knn = config.knn

  def batches(split):
    return pipeline.make_eval_iterator(config, split, train=False,
                                       batch_size=knn.batch_size)
  train_x, train_y = features.extract_pooled(
      backbone, batches(config.data.train_split), mesh, (knn.stage,),
      knn.train_examples)
  test_x, test_y = features.extract_pooled(
      backbone, batches(config.data.eval_split), mesh, (knn.stage,),
      knn.test_examples)
  train_x, test_x = train_x[knn.stage], test_x[knn.stage]
  num_classes = sources.num_classes(config.data)
  train_x, test_x = centre_and_normalize(jnp.asarray(train_x),
                                         jnp.asarray(test_x))
  accuracy = knn_accuracy(train_x, jnp.asarray(train_y),
                          test_x, jnp.asarray(test_y),
                          num_classes, knn.k, knn.temperature)
  return {"knn_top1": accuracy, "num_train": len(train_y),
          "num_test": len(test_y)}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The standalone job: evaluates a pretrained (or random) backbone.

  Args:
    config: a probe config (configs/linear_probe.py).
    workdir: where `knn_results.json` goes.

  Returns:
    The results written.
  """
  mesh = sharding.make_mesh()
  sources.prepare_builtin(config.data)
  backbone = probe.backbone_for(config, mesh,
                                lambda: probe.train_images(config))
  results = dict(probe.results_header(config, backbone),
                 **evaluate(backbone, config, mesh), stage=config.knn.stage,
                 k=config.knn.k, temperature=config.knn.temperature)
  reporting.write_json(workdir, RESULTS_FILE, results)
  return results


def report(results: dict[str, Any]) -> None:
  """Logs the figure on every process."""
  logging.info("kNN top-1 (%s, k=%d): %.4f on %d test / %d train examples.",
               results["stage"], results["k"], results["knn_top1"],
               results["num_test"], results["num_train"])
