"""What a release ships besides code: licence, citation, pinned versions."""

import hashlib
import os
import re
import tomllib

import yaml

from detco_jax import versions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# sha256 of https://www.apache.org/licenses/LICENSE-2.0.txt, unmodified.
APACHE_2_SHA256 = (
    "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30")


def read(path: str) -> str:
  """A repository file's text.

  Args:
    path: relative to the repository root.

  Returns:
    Its content.
  """
  with open(os.path.join(REPO, path), encoding="utf-8") as f:
    return f.read()


def pyproject() -> dict:
  """pyproject.toml, parsed."""
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def distribution(requirement: str) -> str:
  """The normalised distribution name of a requirement string.

  Args:
    requirement: e.g. "tensorflow-cpu>=2.16; sys_platform == 'linux'".

  Returns:
    e.g. "tensorflow-cpu" (PEP 503: lower case, runs of -_. as one -).
  """
  name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)
  return re.sub(r"[-_.]+", "-", name).lower()


def test_the_licence_is_the_apache_2_text_pyproject_declares():
  text = read("LICENSE")
  assert hashlib.sha256(text.encode("utf-8")).hexdigest() == APACHE_2_SHA256
  project = pyproject()["project"]
  assert project["license"] == "Apache-2.0"
  assert project["license-files"] == ["LICENSE"]


def test_the_citation_file_is_cff_1_2_with_the_paper():
  cff = yaml.safe_load(read("CITATION.cff"))
  assert cff["cff-version"] == "1.2.0"
  for key in ("message", "title"):
    assert isinstance(cff[key], str) and cff[key].strip(), key
  assert cff["authors"] and all(
      "name" in a or "family-names" in a for a in cff["authors"])
  project = pyproject()["project"]
  assert cff["version"] == project["version"]
  assert cff["license"] == project["license"]
  [paper] = cff["references"]
  assert paper["title"].startswith("DetCo: Unsupervised Contrastive")
  assert [a["family-names"] for a in paper["authors"]][:2] == ["Xie", "Ding"]
  assert (paper["year"], paper["start"], paper["end"]) == (2021, 8392, 8401)


def test_the_constraints_pin_every_direct_dependency():
  project = pyproject()["project"]
  direct = {distribution(r) for r in
            project["dependencies"] + project["optional-dependencies"]["test"]}
  pinned = {}
  for line in read(os.path.join("constraints", "cpu.txt")).splitlines():
    match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
    if match:
      pinned[distribution(match.group(1))] = match.group(2)
  missing = sorted(direct - set(pinned))
  assert not missing, f"constraints/cpu.txt does not pin {missing}"
  # torch stays optional: the lock is the CPU set the suite needs.
  assert "torch" not in pinned


def test_the_supported_pythons_are_the_tested_ones_the_readme_names():
  project = pyproject()["project"]
  classified = [c.rsplit(" :: ", 1)[1] for c in project["classifiers"]
                if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
  assert classified, "no Python 3.X classifier"
  lowest = min(classified, key=lambda v: int(v.split(".")[1]))
  assert project["requires-python"] == f">={lowest}"
  setup = read("README.md").split("## Set-up", 1)[1].split("\n## ", 1)[0]
  tested = re.search(r"\(tested ([^)]*)\)", setup).group(1)
  for version in classified:
    assert f"{version}." in tested, (version, tested)


def test_versions_names_each_package_with_a_version_string():
  found = versions.installed()
  assert list(found) == ["python"] + [shown for shown, _ in versions.PACKAGES]
  for name, version in found.items():
    assert re.match(r"\d+\.\d+", version), (name, version)
  assert found["detco_jax"] == pyproject()["project"]["version"]
  assert versions.line({"python": "3.11.7", "jax": "0.10.2"}) == (
      "python 3.11.7, jax 0.10.2")
