"""The weighted kNN monitor: against NumPy, on its own train set, as a job."""

import json
import os

import jax.numpy as jnp
import numpy as np
from tensorboard.backend.event_processing import event_accumulator

from configs import linear_probe
from detco_jax.eval import knn


def numpy_knn(train, train_labels, test, num_classes, k, tau):
  """Weighted kNN written out: sort similarities, sum exp(s / tau) per class."""
  predictions = []
  for row in test:
    sim = train @ row
    order = np.argsort(-sim, kind="stable")[:k]
    scores = np.zeros(num_classes)
    for i in order:
      scores[train_labels[i]] += np.exp(sim[i] / tau)
    predictions.append(int(np.argmax(scores)))
  return np.array(predictions)


def unit_rows(rng, n, d):
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_predictions_match_numpy_reference():
  rng = np.random.default_rng(0)
  # Clustered data, so that the votes are not all ties of one class.
  centres = unit_rows(rng, 5, 16)
  train_labels = rng.integers(0, 5, 300)
  train = centres[train_labels] + 0.6 * unit_rows(rng, 300, 16)
  train /= np.linalg.norm(train, axis=1, keepdims=True)
  test_labels = rng.integers(0, 5, 40)
  test = centres[test_labels] + 0.6 * unit_rows(rng, 40, 16)
  test /= np.linalg.norm(test, axis=1, keepdims=True)
  for k, tau in ((200, 0.07), (7, 0.5)):
    got = np.asarray(knn.knn_predict(jnp.asarray(train),
                                     jnp.asarray(train_labels),
                                     jnp.asarray(test), 5, k, tau))
    want = numpy_knn(train, train_labels, test, 5, k, tau)
    np.testing.assert_array_equal(got, want)
  # The clusters are learnable, so accuracy is far above chance (0.2).
  accuracy = knn.knn_accuracy(jnp.asarray(train), jnp.asarray(train_labels),
                              jnp.asarray(test), jnp.asarray(test_labels), 5,
                              chunk=16)
  assert accuracy == np.mean(want == test_labels) and accuracy > 0.8


def test_features_are_centred_on_the_train_mean_then_unit_rows():
  rng = np.random.default_rng(2)
  train = rng.normal(size=(30, 8)).astype(np.float32) + 5.0
  test = rng.normal(size=(7, 8)).astype(np.float32) + 5.0
  got_train, got_test = knn.centre_and_normalize(jnp.asarray(train),
                                                 jnp.asarray(test))
  mean = train.astype(np.float64).mean(0)
  for got, x in ((got_train, train), (got_test, test)):
    want = (x - mean) / np.linalg.norm(x - mean, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  # A shared offset (post-ReLU features have a large one) changes nothing.
  shifted = knn.centre_and_normalize(jnp.asarray(train + 100.0),
                                     jnp.asarray(test + 100.0))
  np.testing.assert_allclose(np.asarray(shifted[1]), np.asarray(got_test),
                             atol=1e-3)


def test_own_train_set_is_classified_perfectly():
  rng = np.random.default_rng(1)
  feats = unit_rows(rng, 500, 64)
  labels = rng.integers(0, 10, 500)  # Random labels: only self-votes help.
  accuracy = knn.knn_accuracy(jnp.asarray(feats), jnp.asarray(labels),
                              jnp.asarray(feats), jnp.asarray(labels), 10,
                              k=200, temperature=0.07, chunk=128)
  assert accuracy == 1.0


def test_job_on_a_pretrained_checkpoint(tiny_pretrain_workdir,
                                        builtin_data_dir, tmp_path):
  config = linear_probe.get_config("tiny")
  config.pretrained = tiny_pretrain_workdir
  config.data.data_dir = builtin_data_dir
  results = knn.run(config, str(tmp_path))
  saved = json.load(open(os.path.join(tmp_path, knn.RESULTS_FILE)))
  assert saved == results
  assert (saved["num_train"], saved["num_test"]) == (256, 64)
  assert 0.0 <= saved["knn_top1"] <= 1.0 and saved["pretrained_step"] == 6


def test_monitor_runs_inside_pretraining(tiny_pretrain_workdir):
  events = event_accumulator.EventAccumulator(
      tiny_pretrain_workdir, size_guidance={event_accumulator.TENSORS: 0,
                                            event_accumulator.SCALARS: 0})
  events.Reload()
  tags = events.Tags()
  tag = "knn/top1"
  records = (events.Tensors(tag) if tag in tags["tensors"] else
             events.Scalars(tag))
  assert [r.step for r in records] == [3, 6]
