"""Backbone shapes, grouped (shuffle) batch norm, heads and the encoder."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from detco_jax.models import detco, heads, resnet


def test_resnet50_at_224_stage_shapes_and_size():
  model = resnet.ResNet(depth=50)
  x = jnp.zeros((2, 224, 224, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x,
                                                train=False))
  out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
  assert {k: v.shape for k, v in out.items()} == {
      "res2": (2, 56, 56, 256), "res3": (2, 28, 28, 512),
      "res4": (2, 14, 14, 1024), "res5": (2, 7, 7, 2048)}
  # torchvision's ResNet-50 without its 1000-way fc: 23,508,032 parameters.
  n = sum(p.size for p in jax.tree.leaves(variables["params"]))
  assert n == 23_508_032


@pytest.mark.parametrize("depth,channels", [(18, (64, 128, 256, 512)),
                                            (34, (64, 128, 256, 512))])
def test_basic_block_resnets(depth, channels):
  assert tuple(resnet.stage_channels(depth).values()) == channels


@pytest.mark.long
def test_narrow_cifar_stem_model_shapes():
  model = resnet.ResNet(depth=18, width=8, stem="cifar")
  x = jnp.ones((4, 32, 32, 3))
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x,
                                          train=False))(x)
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert {k: v.shape for k, v in out.items()} == {
      "res2": (4, 32, 32, 8), "res3": (4, 16, 16, 16),
      "res4": (4, 8, 8, 32), "res5": (4, 4, 4, 64)}


def np_group_bn(x, groups, scale, bias, eps=1e-5):
  """Explicit loop over sub-batches: normalise each with its own stats."""
  out = np.empty_like(x)
  n = x.shape[0] // groups
  for g in range(groups):
    xg = x[g * n:(g + 1) * n]
    mean = xg.mean(axis=(0, 1, 2))
    var = xg.var(axis=(0, 1, 2))
    out[g * n:(g + 1) * n] = (xg - mean) / np.sqrt(var + eps) * scale + bias
  return out


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_group_batch_norm_equals_per_group_computation(groups):
  rng = np.random.default_rng(groups)
  x = (rng.normal(size=(8, 5, 5, 3)) * np.array([1, 3, 0.5])
       + np.arange(8)[:, None, None, None]).astype(np.float32)
  bn = resnet.GroupBatchNorm(groups=groups)
  variables = bn.init(jax.random.key(0), x, use_running_average=False)
  scale = np.array([1.5, 0.5, 2.0], np.float32)
  bias = np.array([0.1, -0.2, 0.3], np.float32)
  variables = {"params": {"scale": scale, "bias": bias},
               "batch_stats": variables["batch_stats"]}
  y, updates = bn.apply(variables, x, use_running_average=False,
                        mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(y), np_group_bn(x, groups, scale, bias),
                             rtol=1e-4, atol=1e-4)
  # Running stats move 10% towards the mean over groups of group stats.
  n = 8 // groups
  means = [x[g * n:(g + 1) * n].mean((0, 1, 2)) for g in range(groups)]
  variances = [x[g * n:(g + 1) * n].var((0, 1, 2)) for g in range(groups)]
  np.testing.assert_allclose(updates["batch_stats"]["mean"],
                             0.1 * np.mean(means, 0), rtol=1e-4)
  np.testing.assert_allclose(updates["batch_stats"]["var"],
                             0.9 + 0.1 * np.mean(variances, 0), rtol=1e-4)


def test_group_batch_norm_eval_uses_running_stats_and_checks_batch():
  bn = resnet.GroupBatchNorm(groups=3)
  x = jnp.ones((6, 2, 2, 1)) * 4.0
  variables = {"params": {"scale": jnp.ones(1), "bias": jnp.zeros(1)},
               "batch_stats": {"mean": jnp.full(1, 2.0), "var": jnp.full(1, 4.)}}
  y = bn.apply(variables, x, use_running_average=True)
  np.testing.assert_allclose(y, (4.0 - 2.0) / np.sqrt(4.0 + 1e-5), rtol=1e-5)
  with pytest.raises(ValueError, match="bn_groups"):
    bn.apply(variables, jnp.ones((4, 2, 2, 1)), use_running_average=False,
             mutable=["batch_stats"])


@pytest.mark.long
def test_frozen_bn_stages_normalise_with_running_statistics_in_training():
  """frozen_bn_stages=2 (the stem and res2): in training, those stages give
  their evaluation-mode maps and keep their statistics; res3 on does not."""
  model = resnet.ResNet(depth=10, width=8, stem="cifar", frozen_bn_stages=2)
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  variables = model.init(jax.random.key(1), x, train=False)
  # Running statistics that batch statistics would not reproduce.
  variables = {"params": variables["params"], "batch_stats": jax.tree.map(
      lambda v: v + 0.5, variables["batch_stats"])}
  trained, new = model.apply(variables, x, train=True, mutable=["batch_stats"])
  evaluated = model.apply(variables, x, train=False)
  np.testing.assert_allclose(trained["res2"], evaluated["res2"], rtol=1e-5,
                             atol=1e-6)
  for stage in ("res3", "res4", "res5"):
    assert not np.allclose(trained[stage], evaluated[stage], atol=1e-3), stage
  for top, stats in new["batch_stats"].items():
    frozen = top == "bn1" or top.startswith("layer1_")
    same = all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(stats), jax.tree.leaves(variables["batch_stats"][top])))
    assert same == frozen, top


def test_jigsaw_head_concatenates_patches_in_order():
  head = heads.JigsawHead(hidden=16, out=8)
  rng = np.random.default_rng(0)
  fmap = jnp.asarray(rng.normal(size=(2 * 9, 3, 3, 4)), jnp.float32)
  variables = head.init(jax.random.key(0), fmap)
  out = head.apply(variables, fmap)
  assert out.shape == (2, 8)
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
  # Reference: pool each patch, concatenate in order, then the MLP.
  pooled = np.asarray(fmap).mean((1, 2)).reshape(2, 36)
  p = variables["params"]["mlp"]
  h = np.maximum(pooled @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0)
  z = h @ p["fc2"]["kernel"] + p["fc2"]["bias"]
  np.testing.assert_allclose(out, z / np.linalg.norm(z, axis=1, keepdims=True),
                             rtol=1e-4, atol=1e-5)
  # Swapping two patches of the first sample changes its embedding only.
  swapped = np.asarray(fmap).copy()
  swapped[[0, 1]] = swapped[[1, 0]]
  out2 = head.apply(variables, jnp.asarray(swapped))
  assert not np.allclose(out2[0], out[0], atol=1e-4)
  np.testing.assert_allclose(out2[1], out[1], rtol=1e-5)


@pytest.mark.long
def test_encoder_outputs_and_unshared_heads():
  enc = detco.DetCoEncoder(depth=18, width=8, stem="cifar", bn_groups=2,
                           local_hidden=32, embed_dim=16)
  views = jnp.ones((4, 16, 16, 3))
  patches = jnp.ones((4, 9, 8, 8, 3))
  variables = jax.jit(lambda v, p: enc.init(jax.random.key(0), v, p,
                                            train=False))(views, patches)
  out, _ = jax.jit(lambda var, v, p: enc.apply(
      var, v, p, train=True, mutable=["batch_stats"]))(variables, views,
                                                       patches)
  for kind in ("global", "local"):
    assert {s: v.shape for s, v in out[kind].items()} == {
        s: (4, 16) for s in resnet.STAGES}
  p = variables["params"]
  # Eight heads, none sharing weights; the global hidden = stage channels.
  names = [k for k in p if k.endswith(resnet.STAGES)]
  assert len(names) == 8
  assert p["global_heads_res3"]["mlp"]["fc1"]["kernel"].shape == (16, 16)
  assert p["local_heads_res3"]["mlp"]["fc1"]["kernel"].shape == (9 * 16, 32)
  only_global = jax.eval_shape(
      lambda var, v: enc.apply(var, v, None, train=False), variables, views)
  assert only_global["local"] == {}


@pytest.mark.long
def test_encoder_is_its_backbone_then_its_heads():
  enc = detco.DetCoEncoder(depth=18, width=8, stem="cifar", bn_groups=2,
                           local_hidden=32, embed_dim=16)
  rng = np.random.default_rng(0)
  views = jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32)
  patches = jnp.asarray(rng.normal(size=(4, 9, 8, 8, 3)), jnp.float32)
  variables = jax.jit(lambda v, p: enc.init(jax.random.key(0), v, p,
                                            train=False))(views, patches)

  @jax.jit
  def both(var, v, p):
    maps, patch_maps = enc.apply(var, v, p, False, method="stage_maps")
    # The heads alone need no backbone parameters.
    head_params = {k: x for k, x in var["params"].items() if k != "backbone"}
    embedded = enc.apply({"params": head_params}, maps, patch_maps,
                         method="heads")
    return patch_maps, embedded, enc.apply(var, v, p, train=False)

  patch_maps, embedded, called = both(variables, views, patches)
  # The patches go through the backbone one by one.
  assert patch_maps["res5"].shape[0] == 4 * 9
  assert set(embedded["local"]) == set(resnet.STAGES)
  jax.tree.map(np.testing.assert_array_equal, embedded, called)


def _encoder_stats(patch_bn_stats):
  enc = detco.DetCoEncoder(depth=10, width=8, stem="cifar", bn_groups=2,
                           local_hidden=32, embed_dim=16,
                           patch_bn_stats=patch_bn_stats)
  rng = np.random.default_rng(1)
  views = jnp.asarray(rng.normal(1.0, 2.0, (4, 16, 16, 3)), jnp.float32)
  # Patches from another distribution, so that their statistics show.
  patches = jnp.asarray(rng.normal(-3.0, 0.5, (4, 9, 8, 8, 3)), jnp.float32)
  variables = enc.init(jax.random.key(0), views, patches, train=False)
  out, updated = enc.apply(variables, views, patches, train=True,
                           mutable=["batch_stats"])
  return enc, variables, views, patches, out, updated["batch_stats"]


@pytest.mark.long
def test_running_stats_accumulate_the_views_alone_by_default():
  enc, variables, views, patches, out, stats = _encoder_stats(False)
  backbone = resnet.ResNet(depth=10, width=8, stem="cifar", bn_groups=2)
  backbone_vars = {"params": variables["params"]["backbone"],
                   "batch_stats": variables["batch_stats"]["backbone"]}
  # The running averages are exactly those of a pass over the views alone.
  _, views_only = backbone.apply(backbone_vars, views, train=True,
                                 mutable=["batch_stats"])
  jax.tree.map(np.testing.assert_array_equal, stats["backbone"],
               views_only["batch_stats"])
  # Blended: the patches' batch statistics are folded in after the views'.
  _, _, _, _, blended_out, blended = _encoder_stats(True)
  _, then_patches = backbone.apply(
      {"params": backbone_vars["params"], **views_only}, patches.reshape(
          (36, 8, 8, 3)), train=True, mutable=["batch_stats"])
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6),
               blended["backbone"], then_patches["batch_stats"])
  assert not np.allclose(blended["backbone"]["bn1"]["mean"],
                         stats["backbone"]["bn1"]["mean"])
  # Either way the patches are normalised with their own batch statistics:
  # the embeddings do not depend on the setting.
  jax.tree.map(np.testing.assert_array_equal, out, blended_out)


@pytest.mark.parametrize("shape,kernel,stride", [
    ((3, 2, 2, 5), 3, 1),   # DetCo's res5 patch maps: the dense layer.
    ((3, 3, 3, 5), 3, 1),   # Its res4 patch maps: the dense layer.
    ((3, 3, 3, 5), 3, 2),   # res5's first conv, 3x3 -> 2x2: dense.
    ((3, 1, 1, 5), 3, 1),
    ((3, 2, 3, 5), 3, 2),
    ((3, 4, 4, 5), 3, 1),   # More pixels than taps: XLA's convolution.
    ((3, 5, 5, 5), 3, 2),
    ((3, 2, 2, 5), 1, 2),   # A 1x1 shortcut: XLA's convolution.
])
def test_small_map_convolution_equals_xla_convolution(shape, kernel, stride):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, shape[-1], 4)),
                  jnp.float32)
  pad = ((kernel // 2, kernel // 2),) * 2
  numbers = jax.lax.conv_dimension_numbers(x.shape, w.shape,
                                           ("NHWC", "HWIO", "NHWC"))

  def ours(x, w):
    return resnet.conv_general_dilated(x, w, (stride, stride), pad,
                                       dimension_numbers=numbers)

  def xla(x, w):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), pad,
                                        dimension_numbers=numbers)

  np.testing.assert_allclose(ours(x, w), xla(x, w), rtol=1e-5, atol=1e-5)
  # Gradients of a non-linear function of the output, both operands.
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  for a, b in zip(jax.grad(loss(ours), (0, 1))(x, w),
                  jax.grad(loss(xla), (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # Maps of no more pixels than the kernel has taps skip XLA's convolution.
  convs = [e for e in jax.make_jaxpr(ours)(x, w).eqns
           if e.primitive.name == "conv_general_dilated"]
  assert bool(convs) == (shape[1] * shape[2] > kernel * kernel)


def test_patch_backbone_runs_no_convolution_on_maps_within_its_kernel():
  """DetCo's 10 px patches: the 3x3 res4 and 2x2 res5 maps take the dense
  layer, which XLA:CPU runs several times faster than its convolution."""
  model = resnet.ResNet(depth=18, width=4, stem="cifar", bn_groups=2)
  x = jnp.zeros((4, 10, 10, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x,
                                                train=False))
  jaxpr = jax.make_jaxpr(lambda v: model.apply(
      v, x, train=True, mutable=["batch_stats"]))(variables)

  def convs(eqns):
    for e in eqns:
      if e.primitive.name == "conv_general_dilated":
        yield e
      for sub in jax.extend.core.jaxprs_in_params(e.params):
        yield from convs(sub.eqns)

  inputs = [e.invars[0].aval.shape for e in convs(jaxpr.eqns)]
  kernels = [e.invars[1].aval.shape for e in convs(jaxpr.eqns)]
  assert inputs and all(s[1] * s[2] > k[0] * k[1]
                        for s, k in zip(inputs, kernels))
  # On the 3x3 res4 map only res5's 1x1 shortcut is left; no 2x2 maps.
  assert [k[:2] for s, k in zip(inputs, kernels) if s[1] <= 3] == [(1, 1)]
