r"""A supervised reference on the built-in dataset: how learnable is `label`?

  python experiments/supervised_reference.py [--epochs=2] [--lr=0.1]

Trains the demo's backbone (ResNet-18 of width 16, small-image stem) end to
end with a linear classifier on pooled res5 features, on `detco_shapes`'
`label` (the main object's shape), with the linear probe's training
views (RandomResizedCrop + flip at the demo's 32 px) and SGD with momentum on a cosine
schedule; then prints test top-1 (resize + centre crop). It tells whether a
probe at chance after the demo pretraining says something about the
representation or about the task at this scale.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top

from configs import detco  # pylint: disable=g-import-not-at-top
from configs import linear_probe  # pylint: disable=g-import-not-at-top
from detco_jax import pretrained  # pylint: disable=g-import-not-at-top
from detco_jax.data import pipeline  # pylint: disable=g-import-not-at-top
from detco_jax.data import sources  # pylint: disable=g-import-not-at-top
from detco_jax.eval import features  # pylint: disable=g-import-not-at-top


def logits_fn(net, norm, params, stats, images, train):
  """Class logits of uint8 images; with `train`, also the new BN stats."""
  x = features.preprocess(images, norm)
  variables = {"params": params["net"], "batch_stats": stats}
  if train:
    maps, updates = net.apply(variables, x, train=True,
                              mutable=["batch_stats"])
  else:
    maps, updates = net.apply(variables, x, train=False), {}
  pooled = maps["res5"].mean(axis=(1, 2))
  return pooled @ params["head"]["w"] + params["head"]["b"], updates


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--epochs", type=float, default=2)
  parser.add_argument("--lr", type=float, default=0.1)
  parser.add_argument("--batch_size", type=int, default=64)
  args = parser.parse_args()

  pre = detco.get_config("demo")  # The demo's backbone and normalisation.
  config = linear_probe.get_config("demo")
  sources.prepare_builtin(config.data)
  net = pretrained.resnet_of(pre)
  crop = config.eval_views.crop_size
  variables = net.init(jax.random.key(0), jnp.zeros((1, crop, crop, 3)),
                       train=False)
  num_classes = sources.num_classes(config.data)
  params = {"net": variables["params"],
            "head": {"w": jnp.zeros((net.width * 8, num_classes)),
                     "b": jnp.zeros((num_classes,))}}
  stats = variables["batch_stats"]
  steps = int(args.epochs * config.data.builtin_num_train // args.batch_size)
  tx = optax.sgd(optax.cosine_decay_schedule(args.lr, steps), momentum=0.9)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, stats, opt_state, images, labels):
    def loss_fn(p):
      logits, updates = logits_fn(net, pre.aug, p, stats, images, True)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return loss.mean(), updates["batch_stats"]
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  predict = jax.jit(lambda p, s, x: logits_fn(net, pre.aug, p, s, x,
                                              False)[0].argmax(-1))
  data = pipeline.make_eval_iterator(config, config.data.train_split,
                                     train=True, batch_size=args.batch_size)
  start = time.time()
  for i in range(steps):
    batch = next(data)
    params, stats, opt_state, loss = step(params, stats, opt_state,
                                          batch["image"], batch["label"])
    if i % 50 == 0 or i == steps - 1:
      print(f"step {i}: loss {float(loss):.4f}", flush=True)
  correct = total = 0
  for batch in pipeline.make_eval_iterator(config, config.data.eval_split,
                                           train=False, batch_size=250):
    real = batch["mask"] > 0
    predicted = np.asarray(predict(params, stats, batch["image"]))
    correct += int((predicted[real] == batch["label"][real]).sum())
    total += int(real.sum())
  print(f"supervised, {steps} steps ({args.epochs} epochs, lr {args.lr}): "
        f"test top-1 {correct / total:.4f} on {total} images; "
        f"{time.time() - start:.0f} s")


if __name__ == "__main__":
  main()
