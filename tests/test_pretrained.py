"""The backbone restore: a partial read of the pretraining checkpoint."""

import shutil

import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from detco_jax import checkpoint as checkpoint_lib
from detco_jax import pretrained
from detco_jax import sharding
from tests import jobcheck


def _full_restore(workdir, step=None):
  """The whole DetCo train state, restored as the train tests do."""
  return jobcheck.restore_train_state(pretrained.load_config(workdir),
                                      workdir, step)


@pytest.fixture
def read_names(monkeypatch):
  """Names of the saved leaves that orbax deserialises, in read order."""
  names = []
  for handler in (ocp.type_handlers.ArrayHandler,
                  ocp.type_handlers.NumpyHandler,
                  ocp.type_handlers.ScalarHandler):
    def spy(self, infos, args=None, *, _original=handler.deserialize):
      names.extend(info.name for info in infos)
      return _original(self, infos, args)
    monkeypatch.setattr(handler, "deserialize", spy)
  return names


@pytest.mark.long
@pytest.mark.parametrize("step", [None, 3])
def test_partial_restore_equals_the_full_state_restore(
    tiny_pretrain_workdir, step):
  backbone = pretrained.load(tiny_pretrain_workdir, step)
  state = _full_restore(tiny_pretrain_workdir, step)
  want_step = 6 if step is None else step
  assert backbone.step == int(state.step) == want_step
  assert backbone.source == f"{tiny_pretrain_workdir} step {want_step}"
  want = {"params": state.params[pretrained.BACKBONE_KEY],
          "batch_stats": state.batch_stats[pretrained.BACKBONE_KEY]}
  assert (jax.tree.structure(backbone.variables) ==
          jax.tree.structure(want))
  for got, ref in zip(jax.tree.leaves(backbone.variables),
                      jax.tree.leaves(want)):
    assert got.dtype == ref.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  # Placed replicated on the mesh, as the probes expect.
  replicated = sharding.replicated(sharding.make_mesh())
  for leaf in jax.tree.leaves(backbone.variables):
    assert leaf.sharding.is_equivalent_to(replicated, leaf.ndim)


def test_reads_only_the_step_and_the_backbone(tiny_pretrain_workdir,
                                              read_names):
  backbone = pretrained.load(tiny_pretrain_workdir)
  assert set(backbone.variables) == {"params", "batch_stats"}
  wanted = {"step"} | {
      f"{field}.{pretrained.BACKBONE_KEY}.{name}"
      for field in ("params", "batch_stats")
      for name in traverse_util.flatten_dict(backbone.variables[field],
                                             sep=".")}
  assert sorted(read_names) == sorted(wanted)
  # The spy does see a full restore read the rest (queues, EMA, optimiser).
  read_names.clear()
  _full_restore(tiny_pretrain_workdir)
  for field in ("queues", "opt_state", "ema_params", "ema_batch_stats"):
    assert any(n.startswith(field + ".") for n in read_names), field


def test_no_config_json_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError,
                     match="config.json not found.*pretraining run"):
    pretrained.load(str(tmp_path))


def test_no_complete_checkpoint_is_a_clear_error(tiny_pretrain_workdir,
                                                 tmp_path):
  shutil.copy(f"{tiny_pretrain_workdir}/config.json", tmp_path)
  with pytest.raises(FileNotFoundError, match="No complete checkpoint in"):
    pretrained.load(str(tmp_path))
  with pytest.raises(FileNotFoundError, match=(
      r"No complete checkpoint 4 in .*available: \[3, 6\]")):
    pretrained.load(tiny_pretrain_workdir, step=4)


@flax.struct.dataclass
class _ProbeLikeState:
  step: jax.Array
  params: dict


def test_checkpoint_without_backbone_says_what_to_pass(tiny_pretrain_workdir,
                                                       tmp_path):
  # A probe's workdir, given a pretraining config.json by mistake.
  shutil.copy(f"{tiny_pretrain_workdir}/config.json", tmp_path)
  state = _ProbeLikeState(jnp.array(2, jnp.int32),
                          {"res5": {"kernel": jnp.ones((4, 3))}})
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), asynchronous=False)
  ckpt.save(2, state)
  # The same Checkpointer, having saved, still reads subtrees partially.
  step = ckpt.restore_subtrees({"step": jax.ShapeDtypeStruct(
      (), jnp.int32, sharding=sharding.replicated(sharding.make_mesh()))})
  assert int(step["step"]) == 2
  ckpt.close()
  with pytest.raises(ValueError, match=(
      r"holds no pretrained backbone: .*has no batch_stats, params/backbone"
      r".* --workdir of a pretraining run")) as error:
    pretrained.load(str(tmp_path))
  assert isinstance(error.value.__cause__, checkpoint_lib.MissingSubtreesError)
  assert error.value.__cause__.missing == ["batch_stats", "params/backbone"]
