"""The documentation site's layout: mkdocs.yml against the files in the repository.

CI builds the site itself (`make docs`, `mkdocs build --strict`, after `make
test`); this file does not run mkdocs. It checks what the build cannot know:
that every layer package has an API page, that every module file under
fedjax_med/ is rendered by some `::: module` directive, that every page the
nav names exists, and that the home page's quick start is the README's.
"""

import pathlib
import re

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE_DIR = ROOT / "fedjax_med"
CONFIG = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
DOCS_DIR = ROOT / CONFIG["docs_dir"]
# The layers, bottom to top (README "Layers", fedjax_med/__init__.py).
LAYER_PACKAGES = ("core", "models", "losses", "metrics", "aggregators", "data", "privacy",
                  "algorithms", "training", "deploy")
DIRECTIVE = re.compile(r"^::: *([\w.]+) *$", re.MULTILINE)


def _nav_pages(node):
  """Every (title, path) of a mkdocs nav, depth first."""
  if isinstance(node, str):
    yield None, node
  elif isinstance(node, list):
    for item in node:
      yield from _nav_pages(item)
  elif isinstance(node, dict):
    for title, value in node.items():
      if isinstance(value, str):
        yield title, value
      else:
        yield from _nav_pages(value)


NAV = list(_nav_pages(CONFIG["nav"]))


def _source(path):
  """The file a nav entry is built from: docs/<path>, or, for a notebook,
  the repository's notebooks/ folder (added to the build by docs/hooks.py)."""
  if path.startswith("notebooks/"):
    return ROOT / path
  return DOCS_DIR / path


def _directives():
  """{dotted module path: the API page that renders it}."""
  found = {}
  for page in sorted((DOCS_DIR / "api").glob("*.md")):
    for target in DIRECTIVE.findall(page.read_text()):
      found[target] = page
  return found


def _module_file(dotted):
  relative = pathlib.Path(*dotted.split("."))
  for candidate in (ROOT / relative.with_suffix(".py"), ROOT / relative / "__init__.py"):
    if candidate.is_file():
      return candidate
  return None


def test_config_is_strict_and_builds_into_site():
  assert CONFIG["strict"] is True
  assert CONFIG["docs_dir"] == "docs" and CONFIG["site_dir"] == "site"
  assert "/site/" in (ROOT / ".gitignore").read_text().split("\n")


def test_every_nav_entry_exists():
  missing = [path for _, path in NAV if not _source(path).is_file()]
  assert not missing, f"mkdocs.yml nav names files that do not exist: {missing}"
  paths = [path for _, path in NAV]
  assert len(paths) == len(set(paths)), "a page is listed twice in the nav"


def test_every_guide_page_and_notebook_is_in_the_nav():
  paths = {path for _, path in NAV}
  guides = {p.name for p in DOCS_DIR.glob("*.md")}
  notebooks = {f"notebooks/{p.name}" for p in (ROOT / "notebooks").glob("*.ipynb")}
  assert len(notebooks) >= 4
  assert guides <= paths, f"not in the nav: {sorted(guides - paths)}"
  assert notebooks <= paths, f"not in the nav: {sorted(notebooks - paths)}"


def test_the_layer_list_is_the_package_list():
  # A new package under fedjax_med/ needs a place in the layers and an API page.
  packages = sorted(p.parent.name for p in PACKAGE_DIR.glob("*/__init__.py"))
  assert packages == sorted(LAYER_PACKAGES), (
      "fedjax_med/ has packages " + str(packages) + "; add docs/api/<package>.md, "
      "list it in mkdocs.yml's nav and in LAYER_PACKAGES here")


@pytest.mark.parametrize("package", LAYER_PACKAGES)
def test_every_layer_package_has_an_api_page_in_the_nav(package):
  api_pages = {path for _, path in NAV if path.startswith("api/")}
  page = f"api/{package}.md"
  assert page in api_pages, f"mkdocs.yml nav has no {page}"
  assert f"fedjax_med.{package}" in DIRECTIVE.findall((DOCS_DIR / page).read_text())


def test_the_top_level_api_page_is_in_the_nav():
  assert "api/index.md" in {path for _, path in NAV}
  assert "fedjax_med" in DIRECTIVE.findall((DOCS_DIR / "api" / "index.md").read_text())


def test_every_module_is_rendered_by_a_directive():
  documented = _directives()
  modules = []
  for path in sorted(PACKAGE_DIR.rglob("*.py")):
    relative = path.relative_to(ROOT).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    if any(part.startswith("_") for part in parts):
      continue  # private modules (data/_renamed.py)
    modules.append(".".join(parts))
  assert "fedjax_med.core.kit" in modules and "fedjax_med.training.loop" in modules
  missing = sorted(set(modules) - set(documented))
  assert not missing, f"no `::: module` directive in docs/api/*.md for {missing}"


def test_every_directive_names_a_module_file():
  wrong = sorted(t for t in _directives() if _module_file(t) is None)
  assert not wrong, f"docs/api/*.md renders modules that do not exist: {wrong}"


def test_home_page_quick_start_is_the_readmes():
  def quick_start(text):
    section = text.split("## Quick start in Python\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)

  readme = (ROOT / "README.md").read_text()
  index = (DOCS_DIR / "index.md").read_text()
  assert quick_start(index) == quick_start(readme)


def test_hooks_and_extensions_are_not_pages():
  excluded = CONFIG["exclude_docs"].split()
  for name in ("hooks.py", "griffe_sections.py"):
    assert (DOCS_DIR / name).is_file() and name in excluded
  assert CONFIG["hooks"] == ["docs/hooks.py"]


def test_prose_sections_keep_every_word():
  pytest.importorskip("griffe")  # the docs extra; CI's `make docs` runs it in the build
  import importlib.util
  spec = importlib.util.spec_from_file_location("griffe_sections",
                                                DOCS_DIR / "griffe_sections.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)

  parsed = "Sums.\n\nArgs:\n  x: `[B]` values.\n    More on x.\n  y, z: weights.\n\nReturns:\n  s."
  assert module.rewrite(parsed) == parsed

  prose = ("Builds it.\n\nArgs:\n  alpha: a > 0.\n  local_epochs, batch_size,\n"
           "  shuffle: as fedavg (the\n  server: none).\n\n"
           "Raises:\n  ValueError when a,\n  or b.\n\nReturns:\n  {\"a\": 1,\n   \"b\": 2}\n")
  assert module.rewrite(prose).split("\n") == [
      "Builds it.", "",
      "**Args:**", "",
      "* alpha: a > 0.",
      "* local_epochs, batch_size, shuffle: as fedavg (the server: none).", "",
      "**Raises:** ValueError when a, or b.", "",
      "**Returns:**", "", "```text", "{\"a\": 1,", " \"b\": 2}", "```", ""]
