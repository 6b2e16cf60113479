"""InfoNCE and the DetCo loss against a NumPy reference of the equations."""

import jax.numpy as jnp
import numpy as np
import pytest

from detco_jax import losses

STAGES = ("res2", "res3", "res4", "res5")
TAU = 0.2


def unit(rng, *shape):
  x = rng.normal(size=shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_info_nce(q, k, queue, tau, margins=False):
  """-log softmax of the positive over [positive, negatives], float64.

  With `margins`, also the positive's cosine minus the hardest and minus
  the mean negative's.
  """
  losses_, hits, hard, mean = [], [], [], []
  for qi, ki in zip(q, k):
    logits = np.concatenate([[qi @ ki], queue @ qi]) / tau
    p = np.exp(logits - logits.max())
    losses_.append(-np.log(p[0] / p.sum()))
    hits.append(float(np.argmax(logits) == 0))
    hard.append(qi @ ki - np.max(queue @ qi))
    mean.append(qi @ ki - np.mean(queue @ qi))
  out = np.array(losses_), np.array(hits)
  return out + (np.array(hard), np.array(mean)) if margins else out


def test_info_nce_matches_numpy():
  rng = np.random.default_rng(0)
  q, k, queue = unit(rng, 8, 16), unit(rng, 8, 16), unit(rng, 32, 16)
  # Make some positives win and some lose so accuracy is informative.
  k[:4] = q[:4] + 0.1 * k[:4]
  ref, _ = np_info_nce(q, k, queue, TAU)
  got = losses.info_nce(jnp.asarray(q), jnp.asarray(k), jnp.asarray(queue), TAU)
  assert got.shape == (8,)
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


def test_info_nce_accuracy_matches_argmax():
  rng = np.random.default_rng(1)
  q, k, queue = unit(rng, 16, 8), unit(rng, 16, 8), unit(rng, 24, 8)
  k[::2] = q[::2]
  _, ref_hits = np_info_nce(q, k, queue, TAU)
  _, hits = losses.info_nce_and_accuracy(jnp.asarray(q), jnp.asarray(k),
                                         jnp.asarray(queue), TAU)
  np.testing.assert_array_equal(np.asarray(hits), ref_hits)
  assert 0 < ref_hits.mean() < 1


def make_inputs(seed, b=6, d=8, k=12):
  rng = np.random.default_rng(seed)
  emb = lambda: {s: unit(rng, b, d) for s in STAGES}
  queue = lambda: {s: unit(rng, k, d) for s in STAGES}
  return emb(), emb(), emb(), emb(), queue(), queue()


def np_detco(inputs, weights, terms):
  qg, ql, kg, kl, gq, lq = inputs
  spec = {"gg": (qg, kg, gq), "ll": (ql, kl, lq), "gl": (ql, kg, gq),
          "lg": (qg, kl, lq)}
  total, metrics = 0.0, {}
  for s, w in weights.items():
    for t in terms:
      q, k, queue = spec[t]
      loss, hits, hard, mean = np_info_nce(q[s], k[s], queue[s], TAU,
                                           margins=True)
      metrics[f"{s}/{t}"], metrics[f"{s}/{t}_acc"] = loss.mean(), hits.mean()
      metrics[f"{s}/{t}_margin"] = hard.mean()
      metrics[f"{s}/{t}_mean_margin"] = mean.mean()
      total += w * loss.mean()
  return total, metrics


@pytest.mark.parametrize("weights,terms", [
    ({"res2": 0.1, "res3": 0.4, "res4": 0.7, "res5": 1.0}, ("gg", "ll", "gl")),
    ({"res3": 0.4, "res5": 1.0}, ("gg", "ll", "gl")),        # partial weights
    ({"res5": 1.0}, ("gg",)),                               # MoCo v2
    ({"res2": 0.1, "res3": 0.4, "res4": 0.7, "res5": 1.0}, ("gg",)),
    ({"res5": 1.0}, ("gg", "ll", "gl")),                    # single level
    ({"res4": 0.5, "res5": 1.0}, ("gg", "ll", "gl", "lg")),  # symmetric
])
def test_detco_loss_matches_numpy(weights, terms):
  inputs = make_inputs(hash(terms) % 1000)
  ref_total, ref_metrics = np_detco(inputs, weights, terms)
  as_jnp = [{s: jnp.asarray(v) for s, v in d.items()} for d in inputs]
  total, metrics = losses.detco_loss(*as_jnp, temperature=TAU,
                                     weights=weights, terms=terms)
  np.testing.assert_allclose(float(total), ref_total, rtol=1e-5)
  assert set(metrics) == set(ref_metrics)
  for name, value in ref_metrics.items():
    np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-5,
                               atol=1e-6, err_msg=name)


def test_gl_term_uses_local_query_and_global_key():
  qg, ql, kg, kl, gq, lq = make_inputs(3)
  # Make the g<->l pair a perfect match; other pairs stay random.
  kg = {s: ql[s].copy() for s in STAGES}
  args = [{s: jnp.asarray(v) for s, v in d.items()}
          for d in (qg, ql, kg, kl, gq, lq)]
  _, metrics = losses.detco_loss(*args, temperature=TAU,
                                 weights={"res5": 1.0}, terms=("gg", "gl"))
  assert float(metrics["res5/gl_acc"]) == 1.0
  assert float(metrics["res5/gl"]) < float(metrics["res5/gg"])


def test_unknown_term_is_an_error():
  inputs = [{s: jnp.asarray(v) for s, v in d.items()} for d in make_inputs(0)]
  with pytest.raises(ValueError, match="Unknown loss terms"):
    losses.detco_loss(*inputs, temperature=TAU, weights={"res5": 1.0},
                      terms=("gx",))
