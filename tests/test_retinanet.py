"""RetinaNet: pyramid shapes, head init and sharing, the anchor order
contract, pretrained-backbone slotting, freezing, and sharded == unsharded."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detco_jax import sharding
from detco_jax.models import resnet, retinanet

# A tiny ResNet-10 RetinaNet. 64 head channels are 2 per GN group: with one,
# GN maps a 1x1 level (P6 and P7 at 64 px) to a constant, cutting its gradient.
TINY = dict(num_classes=3, depth=10, width=8, num_anchors=2, head_channels=64)
SIZE = 64
BATCH = 8


def tiny(**overrides) -> retinanet.RetinaNet:
  return retinanet.RetinaNet(**{**TINY, **overrides})


def images(seed: int = 0, batch: int = BATCH, size: int = SIZE) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


@pytest.fixture(scope="module")
def variables():
  """Initial variables; every frozen/BN setting shares this tree."""
  return jax.jit(lambda x: tiny().init(jax.random.key(0), x, train=False))(
      images())


def leaves(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("levels,extra", [((3, 4, 5), (6, 7)),
                                          ((2, 3, 4, 5), ())])
def test_pyramid_and_output_shapes(levels, extra):
  model = tiny(levels=levels, extra_levels=extra)
  x = jax.ShapeDtypeStruct((2, SIZE, SIZE, 3), jnp.float32)
  abstract = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), x)
  cls, box = jax.eval_shape(lambda v, x: model.apply(v, x, train=True,
                                                     mutable=["batch_stats"]),
                            abstract, x)[0]
  a_total = sum(math.ceil(SIZE / 2**l)**2 for l in levels + extra) * 2
  assert cls.shape == (2, a_total, 3) and box.shape == (2, a_total, 4)
  assert cls.dtype == box.dtype == jnp.float32

  backbone = resnet.ResNet(depth=10, width=8)
  maps = jax.eval_shape(
      lambda x: backbone.init_with_output(jax.random.key(0), x, False)[0], x)
  fpn = retinanet.FPN(32, levels, extra)
  pyramid = jax.eval_shape(
      lambda m: fpn.init_with_output(jax.random.key(0), m)[0], maps)
  assert list(pyramid) == list(levels + extra)
  assert {l: m.shape for l, m in pyramid.items()} == {
      l: (2, math.ceil(SIZE / 2**l), math.ceil(SIZE / 2**l), 32)
      for l in levels + extra}


def test_image_not_a_multiple_of_the_coarsest_stride_is_rejected():
  # 72 px: res4 is 5x5, but res5 (3x3) upsamples to 6x6.
  x = jax.ShapeDtypeStruct((1, 72, 72, 3), jnp.float32)
  with pytest.raises(ValueError, match="multiple of the coarsest"):
    jax.eval_shape(lambda x: tiny().init(jax.random.key(0), x, train=False), x)


@pytest.mark.parametrize("levels,extra", [((3, 5), ()), ((3, 4), (6,)),
                                          ((1, 2, 3), ()), ((3, 4, 5), (7,)),
                                          ((), (6, 7)), ((4, 3), ())])
def test_bad_level_configurations_are_rejected(levels, extra):
  with pytest.raises(ValueError, match="contiguous"):
    retinanet.check_levels(levels, extra)


@pytest.mark.long
def test_classification_prior(variables):
  head = variables["params"]["head"]
  np.testing.assert_allclose(head["cls_score"]["bias"], -math.log(99),
                             rtol=1e-6)
  assert not np.any(head["bbox_pred"]["bias"])
  cls, _ = jax.jit(lambda v, x: tiny().apply(v, x, train=False))(
      variables, images())
  probs = np.asarray(jax.nn.sigmoid(cls))
  # normal(0.01) weights keep every logit near the bias; their spread lifts
  # the mean probability a little (sigmoid is convex there).
  assert abs(probs.mean() - 0.01) < 1e-3
  assert 0.005 < probs.min() and probs.max() < 0.02


@pytest.mark.long
def test_head_parameters_are_shared_across_levels():
  head = retinanet.RetinaNetHead(num_classes=3, num_anchors=2, channels=32)
  key = jax.random.key(1)
  a = jax.random.normal(key, (2, 4, 4, 32))
  b = jax.random.normal(jax.random.fold_in(key, 1), (2, 2, 3, 32))
  v_two = head.init(key, [a, b])
  v_one = head.init(key, [a])
  # One set of parameters, however many levels.
  assert (jax.tree.map(np.shape, v_two) == jax.tree.map(np.shape, v_one))
  both = head.apply(v_two, [a, b])
  alone = [head.apply(v_two, [m]) for m in (a, b)]
  for i in range(2):
    np.testing.assert_allclose(
        both[i], np.concatenate([alone[0][i], alone[1][i]], 1), rtol=1e-6)


def test_flattened_order_is_level_then_y_then_x_then_anchor():
  k, a = 3, 2
  c = a * k
  head = retinanet.RetinaNetHead(num_classes=k, num_anchors=a, num_convs=0,
                                 norm="none")
  # Non-square second level, so a y/x swap shows.
  maps = [jnp.zeros((2, 4, 4, c)), jnp.zeros((2, 3, 5, c))]
  params = head.init(jax.random.key(0), maps)["params"]
  # Centre taps only: cls channel j = input channel j, and box channel j =
  # input channel j for j < c.
  eye = np.zeros((3, 3, c, c), np.float32)
  eye[1, 1] = np.eye(c)
  box_kernel = np.zeros((3, 3, c, a * 4), np.float32)
  box_kernel[1, 1, :, :c] = np.eye(c)
  params = {"cls_score": {"kernel": eye, "bias": np.zeros(c, np.float32)},
            "bbox_pred": {"kernel": box_kernel,
                          "bias": np.zeros(a * 4, np.float32)}}
  b, y, x, anchor, cls_k = 1, 2, 1, 1, 2
  channel = anchor * k + cls_k
  maps[1] = maps[1].at[b, y, x, channel].set(7.0)
  cls, box = head.apply({"params": params}, maps)

  index = 4 * 4 * a + (y * 5 + x) * a + anchor
  expected_cls = np.zeros(cls.shape, np.float32)
  expected_cls[b, index, cls_k] = 7.0
  np.testing.assert_array_equal(cls, expected_cls)
  # Box channel `channel` is anchor channel // 4, coordinate channel % 4.
  expected_box = np.zeros(box.shape, np.float32)
  box_index = 4 * 4 * a + (y * 5 + x) * a + channel // 4
  expected_box[b, box_index, channel % 4] = 7.0
  np.testing.assert_array_equal(box, expected_box)


@pytest.mark.long
def test_with_backbone_slots_a_pretrained_resnet_in(variables):
  x = images(batch=1)
  pretrained = jax.jit(lambda x: resnet.ResNet(depth=10, width=8).init(
      jax.random.key(7), x, train=False))(x)
  # Non-trivial statistics, as a pretrained ResNet has.
  pretrained["batch_stats"] = jax.tree.map(lambda s: s + 0.5,
                                           pretrained["batch_stats"])
  before = leaves(variables)
  merged = retinanet.RetinaNet.with_backbone(variables, pretrained)

  for collection in ("params", "batch_stats"):
    got = leaves(merged[collection]["backbone"])
    want = leaves(pretrained[collection])
    assert got.keys() == want.keys()
    for name in want:
      assert np.array_equal(got[name], want[name]), name
  assert not np.array_equal(merged["params"]["backbone"]["conv1"]["kernel"],
                            variables["params"]["backbone"]["conv1"]["kernel"])
  for name in ("fpn", "head"):
    assert merged["params"][name] is variables["params"][name]
  # The input is untouched.
  after = leaves(variables)
  assert all(np.array_equal(before[n], after[n]) for n in before)

  for mismatch in (dict(width=16), dict(depth=18)):
    other = jax.eval_shape(lambda x, m=mismatch: resnet.ResNet(**m).init(
        jax.random.key(0), x, train=False), x)
    with pytest.raises(ValueError, match="does not fit"):
      retinanet.RetinaNet.with_backbone(variables, other)


def train_step(model: retinanet.RetinaNet, variables, x):
  """Gradients of a fixed random projection of the outputs, and new stats."""
  def loss(params):
    (cls, box), new = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, x,
        train=True, mutable=["batch_stats"])
    r = jax.random.key(3)
    value = (jnp.sum(cls * jax.random.normal(r, cls.shape))
             + jnp.sum(box * jax.random.normal(jax.random.fold_in(r, 1),
                                               box.shape)))
    return value, new["batch_stats"]
  grads, stats = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
  return leaves(grads), leaves(stats)


def stage_of(name: str) -> int:
  """FREEZE_AT index of a `keystr` parameter name: 1 stem, 2 res2, ..."""
  top = name.split("'")[3]  # ['backbone']['layer2_0']... -> layer2_0
  return int(top[5]) + 1 if top.startswith("layer") else 1


@pytest.mark.long
@pytest.mark.parametrize("frozen_stages", [0, 2, 5])
def test_frozen_stages_get_no_gradient(variables, frozen_stages):
  grads, _ = train_step(tiny(frozen_stages=frozen_stages), variables,
                        images())
  backbone = {n for n in grads if n.startswith("['backbone']")}
  assert len(backbone) > 30
  for name, g in grads.items():
    if name in backbone and stage_of(name) <= frozen_stages:
      assert not np.any(g), name
    else:
      assert np.any(g), name


@pytest.mark.long
@pytest.mark.parametrize("frozen_stages", [0, 2, 5])
def test_frozen_stages_keep_their_bn_statistics_under_sync_bn(variables,
                                                              frozen_stages):
  """As detectron2's FrozenBN in frozen stages: SyncBN moves the running
  statistics of the trained stages only."""
  _, stats = train_step(tiny(frozen_stages=frozen_stages), variables,
                        images())
  old = leaves(variables["batch_stats"])
  assert len(old) > 10
  for name in old:
    unchanged = np.array_equal(stats[name], old[name])
    assert unchanged == (stage_of(name) <= frozen_stages), name


@pytest.mark.long
@pytest.mark.parametrize("backbone_bn", ["frozen", "sync"])
def test_backbone_batch_norm(variables, backbone_bn):
  grads, stats = train_step(tiny(backbone_bn=backbone_bn), variables,
                            images())
  old = leaves(variables["batch_stats"])
  assert stats.keys() == old.keys() and len(old) > 10
  for name in old:
    unchanged = np.array_equal(stats[name], old[name])
    assert unchanged == (backbone_bn == "frozen"), name
  bn = [n for n in grads if n.startswith("['backbone']")
        and n.endswith(("['scale']", "['bias']"))]
  assert len(bn) == len(old)  # Each BN: scale and bias; mean and var.
  for name, g in grads.items():
    assert np.any(g) == (backbone_bn == "sync" or name not in bn), name


@pytest.mark.long
def test_sharded_forward_equals_unsharded(variables):
  mesh = sharding.make_mesh()
  assert mesh.size == 8
  model = tiny()
  forward = jax.jit(lambda v, x: model.apply(v, x, train=True,
                                             mutable=["batch_stats"]))
  x = images(seed=5)
  single = jax.device_put((variables, x), jax.devices()[0])
  (cls1, box1), stats1 = forward(*single)
  (cls8, box8), stats8 = forward(
      jax.device_put(variables, sharding.replicated(mesh)),
      jax.device_put(x, sharding.batch_sharded(mesh)))
  assert cls8.sharding.is_equivalent_to(sharding.batch_sharded(mesh), 3)
  # Sync BN's batch moments are summed per device and then all-reduced, in
  # another order than one device's sum: float32 rounding (~1e-7 relative)
  # differs, and is renormalised through ~10 BN/GN layers (seen: 1e-5 on
  # logits of size 5).
  tol = dict(rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(cls8, cls1, **tol)
  np.testing.assert_allclose(box8, box1, **tol)
  got, want = leaves(stats8), leaves(stats1)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], **tol, err_msg=name)
