"""The version lives in one place, and the citation metadata agrees with it.

`fedjax_med/__init__.py`'s `__version__` is the version: pyproject.toml reads it
(setuptools' `attr:`, statically, without importing jax), CITATION.cff,
the README's BibTeX entry and CHANGELOG.md must name the same one.
(CITATION.cff is also validated against the CFF 1.2.0 schema with
`cffconvert --validate`, which is not a test dependency: it pins jsonschema < 4.)
"""

import ast
import pathlib
import re

import pytest

import fedjax_med as fm

REPO = pathlib.Path(__file__).resolve().parent.parent


def _toml():
  try:
    import tomllib
  except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")
  with open(REPO / "pyproject.toml", "rb") as f:
    return tomllib.load(f)


def _cff():
  yaml = pytest.importorskip("yaml")
  return yaml.safe_load((REPO / "CITATION.cff").read_text())


def test_version_is_a_literal_that_setuptools_reads_without_importing():
  tree = ast.parse((REPO / "fedjax_med" / "__init__.py").read_text())
  literals = [node.value.value for node in tree.body
              if isinstance(node, ast.Assign)
              and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["__version__"]
              and isinstance(node.value, ast.Constant)]
  assert literals == [fm.__version__]
  assert re.fullmatch(r"\d+\.\d+\.\d+", fm.__version__)


def test_pyproject_takes_the_version_from_the_package():
  meta = _toml()
  assert "version" not in meta["project"]
  assert "version" in meta["project"]["dynamic"]
  assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fedjax_med.__version__"}


def test_citation_cff_names_this_version():
  cff = _cff()
  assert cff["cff-version"] == "1.2.0"
  assert str(cff["version"]) == fm.__version__
  assert cff["license"] == _toml()["project"]["license"]
  preferred = cff["preferred-citation"]
  assert preferred["type"] == "software"
  assert str(preferred["version"]) == fm.__version__
  assert str(preferred["date-released"]) == str(cff["date-released"])
  assert str(preferred["year"]) == str(cff["date-released"])[:4]
  assert cff["authors"] and all(a.get("name") or a.get("family-names") for a in cff["authors"])


def test_readme_bibtex_and_changelog_name_this_version():
  readme = (REPO / "README.md").read_text()
  citing = readme.split("## Citing", 1)[1].split("\n## ", 1)[0]
  entry = re.search(r"```bibtex\n(@\w+\{fedjax_med.*?)\n```", citing, re.S)
  assert entry, "README's Citing section has no BibTeX entry for fedjax_med"
  assert f"Version {fm.__version__}" in entry.group(1)
  date = str(_cff()["date-released"])
  changelog = (REPO / "CHANGELOG.md").read_text()
  assert f"## [{fm.__version__}] - {date}" in changelog
  assert "## [Unreleased]" in changelog
