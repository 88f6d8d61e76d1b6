"""Griffe extension: keep `Args:` / `Raises:` / `Returns:` sections written as prose.

The code's docstrings are Google style, but some sections are prose rather than
one `name: description` item per line, e.g.

    Raises:
      ValueError naming the site index and the field on wrong ranks,
      mismatched feature or label shapes, ...

    Args:
      client_optimizer, local_epochs, local_steps, batch_size, shuffle,
        cohort_size, ...: as `fedjax_med.algorithms.fedavg`.

Griffe's Google parser drops every line of such a section that is not a
`name: description` pair (with a warning), and mangles a section laid out with
its own indentation (a dict written as a table, under `Returns:`). This
extension, run before parsing, rewrites only those sections (a section whose
items all parse, with griffe's indentation, is left to griffe) into Markdown
that keeps every word: a bold title, then the items as a list (Args), one
paragraph (Raises) or the block as it is written (Returns, Yields). No
docstring in fedjax_med/ is edited.

Loaded by mkdocstrings (`extensions:` in mkdocs.yml), path relative to the
repository root, where `make docs` runs mkdocs.
"""

import re

import griffe

# Section titles whose items griffe reads as `name: description` (or
# `Exception: description`); the value says how prose is kept.
_SECTIONS = {
    "args": "list", "arguments": "list", "params": "list", "parameters": "list",
    "keyword args": "list", "keyword arguments": "list", "other args": "list",
    "other arguments": "list", "other params": "list", "other parameters": "list",
    "raises": "paragraph", "exceptions": "paragraph",
    "returns": "block", "yields": "block",
}
_HEADER = re.compile(r"^(?P<title>[A-Za-z][A-Za-z ]*):\s*$")
# A line griffe can split into `name: description` (name without spaces, or a
# comma-separated list of names, optionally followed by `(type)`).
_ITEM = re.compile(r"^[\w*.]+(\s*,\s*[\w*.]+)*(\s*\([^)]*\))?\s*:(\s|$)")


def _indent(line):
  return len(line) - len(line.lstrip(" "))


def _items(block, base):
  """Groups a section's lines into items; a line at the base indent starts a new
  item unless the previous line ends with a comma or a parenthesis is open."""
  items = []
  for line in block:
    if not line.strip():
      continue
    text = line.strip()
    if items and (_indent(line) > base or items[-1].endswith(",")
                  or items[-1].count("(") > items[-1].count(")")):
      items[-1] += " " + text
    else:
      items.append(text)
  return items


def rewrite(docstring):
  """`docstring` with each unparseable Args/Raises section turned into Markdown."""
  lines = docstring.split("\n")
  out = []
  i = 0
  while i < len(lines):
    line = lines[i]
    match = _HEADER.match(line)
    style = _SECTIONS.get(match.group("title").lower()) if match else None
    if style is None or (out and out[-1].strip()):
      out.append(line)
      i += 1
      continue
    end = i + 1
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > 0):
      end += 1
    block = lines[i + 1:end]
    while block and not block[-1].strip():
      block.pop()
      end -= 1
    if not block:
      out.append(line)
      i += 1
      continue
    base = min(_indent(b) for b in block if b.strip())
    heads = [b.strip() for b in block if b.strip() and _indent(b) == base]
    # griffe reads a continuation line at exactly 2 * base (or deeper); one in
    # between is "confusing indentation".
    irregular = any(base < _indent(b) < 2 * base for b in block if b.strip())
    parses = style == "block" or all(_ITEM.match(h) for h in heads)
    if parses and not irregular:
      out.extend(lines[i:end])
    else:
      title = f"**{match.group('title')}:**"
      if style == "block":
        out.extend([title, "", "```text"] + [b[base:] for b in block] + ["```"])
      elif style == "paragraph":
        out.append(title + " " + " ".join(b.strip() for b in block if b.strip()))
      else:
        out.extend([title, ""] + ["* " + item for item in _items(block, base)])
    i = end
  return "\n".join(out)


class ProseSections(griffe.Extension):
  """Rewrites prose Args/Raises sections of every loaded object's docstring."""

  def on_object(self, *, obj, **kwargs):
    if obj.docstring is not None:
      obj.docstring.value = rewrite(obj.docstring.value)
