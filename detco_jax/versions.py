"""The versions a job runs with, for its log and the suite's record.

Read from the installed distributions' metadata (`importlib.metadata`), so
that asking imports nothing heavy: a job logs them before JAX starts work,
and a result read later says which build produced it.
"""

import importlib.metadata
import platform

# (name shown, distributions that provide it, first installed wins).
# TensorFlow ships as `tensorflow-cpu` on Linux (pyproject.toml) and as
# `tensorflow` elsewhere.
PACKAGES = (
    ("jax", ("jax",)),
    ("jaxlib", ("jaxlib",)),
    ("flax", ("flax",)),
    ("optax", ("optax",)),
    ("orbax-checkpoint", ("orbax-checkpoint",)),
    ("tensorflow", ("tensorflow", "tensorflow-cpu")),
    ("numpy", ("numpy",)),
    ("detco_jax", ("detco_jax",)),
)
MISSING = "not installed"


def _version(distributions: tuple[str, ...]) -> str:
  """The version of the first of `distributions` that is installed.

  Args:
    distributions: distribution names, in order of preference.

  Returns:
    Its version string, or `MISSING`.
  """
  for name in distributions:
    try:
      return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      continue
  return MISSING


def installed() -> dict[str, str]:
  """Python's version and those of the packages that decide a result.

  Returns:
    {"python": "3.11.7", "jax": ..., "jaxlib": ..., "flax": ..., "optax":
    ..., "orbax-checkpoint": ..., "tensorflow": ..., "numpy": ...,
    "detco_jax": ...}, each a version string or "not installed".
  """
  found = {"python": platform.python_version()}
  for shown, distributions in PACKAGES:
    found[shown] = _version(distributions)
  return found


def line(found: dict[str, str] | None = None) -> str:
  """`installed()` as one log line: "python 3.11.7, jax 0.10.2, ...".

  Args:
    found: the versions to show; `installed()` when None.

  Returns:
    The names and versions, comma-separated.
  """
  found = installed() if found is None else found
  return ", ".join(f"{name} {version}" for name, version in found.items())
