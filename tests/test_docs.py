"""The README and docs/ stay short, self-contained and linked correctly."""

import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Folders and files that make up the repository (not the venv, not runs).
TREES = (".ci", "configs", "constraints", "detco_jax", "docs", "experiments",
         "launch", "tests")
ROOT_FILES = ("README.md", "pyproject.toml", ".gitignore", "CITATION.cff")
TEXT = (".py", ".md", ".sh", ".sbatch", ".toml", ".txt", "")

# What a reader of a clone cannot follow: a folder beside the repository,
# the notes it was built from, an issue tracker and its numbers.
OUTSIDE = re.compile("|".join([
    r"\.\./" + "shared",
    "DETCO_" + "SPEC",
    "DESIGN" + r"\.md",
    r"\b" + "tracker" + r"\b",
    r"\b[Ii]ssues? " + r"#?\d+",
    r"/work/" + r"(main|shared)",
]))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def repo_files():
  """Every text file of the repository, relative to its root."""
  for name in ROOT_FILES:
    yield name
  for tree in TREES:
    for folder, dirs, files in os.walk(os.path.join(REPO, tree)):
      dirs[:] = [d for d in dirs if d != "__pycache__"]
      for name in files:
        if os.path.splitext(name)[1] in TEXT:
          yield os.path.relpath(os.path.join(folder, name), REPO)


def docs():
  """README.md and every docs/ page."""
  return ["README.md"] + sorted(
      os.path.join("docs", n) for n in os.listdir(os.path.join(REPO, "docs"))
      if n.endswith(".md"))


def read(path):
  with open(os.path.join(REPO, path), encoding="utf-8") as f:
    return f.read()


def anchors(markdown):
  """GitHub's anchors of a page's headings."""
  out, code = set(), False
  for line in markdown.splitlines():
    code ^= line.startswith("```")
    match = not code and re.match(r"#+ (.*)", line)
    if match:
      slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
      out.add(slug.replace(" ", "-"))
  return out


def test_readme_is_at_most_300_lines():
  assert len(read("README.md").splitlines()) <= 300


def test_nothing_points_outside_the_repository():
  found = []
  for path in repo_files():
    if path == os.path.join("tests", "test_docs.py"):
      continue  # Its patterns and their checks.
    for number, line in enumerate(read(path).splitlines(), 1):
      if OUTSIDE.search(line):
        found.append(f"{path}:{number}: {line.strip()}")
  assert not found, "\n".join(found)


def test_the_check_catches_what_it_should():
  for text in ("see ../" + "shared/x", "issue " + "15 of the tracker",
               "Issues #" + "3", "the " + "tracker"):
    assert OUTSIDE.search(text), text
  assert not OUTSIDE.search("a known issue with torch 2.2")


@pytest.mark.parametrize("page", docs())
def test_links_resolve(page):
  folder = os.path.dirname(page)
  for target in LINK.findall(read(page)):
    if re.match(r"[a-z]+://", target):
      continue
    path, _, anchor = target.partition("#")
    path = os.path.normpath(os.path.join(folder, path)) if path else page
    assert os.path.exists(os.path.join(REPO, path)), f"{page}: {target}"
    if anchor and path.endswith(".md"):
      assert anchor in anchors(read(path)), f"{page}: {target}"


@pytest.mark.parametrize("page", docs()[1:])
def test_each_docs_page_opens_with_the_question_it_answers(page):
  lines = read(page).splitlines()
  assert lines[0].startswith("# "), page
  opening = " ".join(lines[1:8])
  assert re.search(r"\*[^*]+\?\*", opening), page
