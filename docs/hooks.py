"""MkDocs hook: the notebooks in notebooks/ become pages of the site.

The notebooks live next to the code (tests/test_notebooks.py executes them and
notebooks/src/build_notebooks.py writes them), outside `docs_dir`. A symlink
docs/notebooks -> ../notebooks would break git checkouts on Windows, and a copy
would go stale, so this hook adds each notebook to the build's file list as a
file whose source directory is the repository root: `notebooks/01_quickstart.ipynb`
is read where it is and rendered to `site/notebooks/01_quickstart/`. (A File
with a real `src_dir`, not `File.generated`: mkdocs-jupyter wraps the file and
needs `src_dir` to find it.)

`on_files` runs at priority 50, before mkdocs-jupyter's (priority 0), so the
mkdocs-jupyter plugin sees these files and renders them (without executing
them: `execute: false` in mkdocs.yml).
"""

import os

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

NOTEBOOKS_DIR = "notebooks"


def _root(config):
  return os.path.dirname(os.path.abspath(config.config_file_path))


def _notebooks_dir(config):
  return os.path.join(_root(config), NOTEBOOKS_DIR)


def on_config(config):
  # `mkdocs serve` rebuilds when a notebook changes.
  config.watch.append(_notebooks_dir(config))
  return config


@event_priority(50)
def on_files(files, config):
  directory = _notebooks_dir(config)
  for name in sorted(os.listdir(directory)):
    if name.endswith(".ipynb"):
      files.append(File(f"{NOTEBOOKS_DIR}/{name}", src_dir=_root(config),
                        dest_dir=config.site_dir,
                        use_directory_urls=config.use_directory_urls))
  return files
