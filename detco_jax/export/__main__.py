"""`python -m detco_jax.export`: the export's command line (see the package).

The flags are defined here, not on import of the package, so that importing
`detco_jax.export` next to other jobs cannot clash on flag names. The
package imports JAX only once it exports, so a missing or unreadable
`--pretrained` and an `--out` that cannot be written fail as one line first.
"""

from detco_jax import cli  # First: it quiets TensorFlow's import.

# pylint: disable=g-import-not-at-top,wrong-import-order
from absl import flags

from detco_jax import config_checks
from detco_jax import export

# absl's --help prints the main module's docstring: the package's documents
# the command.
__doc__ = export.__doc__  # pylint: disable=redefined-builtin


def define_flags() -> None:
  """The export's flags."""
  flags.DEFINE_string(
      "pretrained", None, "A pretraining run's --workdir, or a checkpoint "
      "file (torchvision / MoCo / DetCo .pth, detectron2 .pkl).")
  flags.DEFINE_string("workdir", None, "The pretraining run's --workdir "
                      "(the same as --pretrained=WORKDIR).")
  flags.DEFINE_integer("step", None, "Checkpoint step of a workdir; default "
                       "the latest.")
  flags.DEFINE_enum("format", None, list(export.FORMATS), "Output format.",
                    required=True)
  flags.DEFINE_string("out", None, "Output file.", required=True)
  flags.mark_flags_as_mutual_exclusive(["pretrained", "workdir"],
                                       required=True)


def check_flags() -> None:
  """The source and --out, checked before JAX loads (`cli.run`)."""
  f = flags.FLAGS
  config_checks.check_source(f.pretrained or f.workdir, f.step)
  config_checks.check_output_file("out", f.out)


def main() -> None:
  """Exports with the command-line flags."""
  f = flags.FLAGS
  export.run(f.pretrained or f.workdir, f.format, f.out, f.step)


if __name__ == "__main__":
  cli.run(main, define_flags, precheck=check_flags)
