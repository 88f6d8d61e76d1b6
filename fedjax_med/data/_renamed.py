"""Earlier keyword names of the data loaders, kept for one version.

One name per concept: K, the number of sites, is `num_sites` everywhere.
`chase_db1(num_clients=...)` and `tox21(num_partners=...)` (version 0.1)
keep working until `REMOVED_IN`, with a DeprecationWarning.
"""

from __future__ import annotations

import functools
import inspect
import warnings

from fedjax_med.core.options import OptionError

REMOVED_IN = "0.3"


def renamed_keyword(old: str, new: str):
  """Decorator: `fn(old=v)` is `fn(new=v)`, with a DeprecationWarning naming `new`.

  The value is passed on unchanged, so the result is the one `new=v` gives.
  Giving both (`new` by keyword or by position) is an OptionError. The
  wrapped function's signature (`inspect.signature`) is `fn`'s, without `old`.
  """

  def wrap(fn):
    position = list(inspect.signature(fn).parameters).index(new)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      if old in kwargs:
        if new in kwargs or len(args) > position:
          raise OptionError(f"{fn.__name__}: give {new} only; {old} is its deprecated"
                            f" earlier name")
        warnings.warn(f"{fn.__name__}: {old}= is deprecated, use {new}= (the same value);"
                      f" {old} is removed in {REMOVED_IN}", DeprecationWarning, stacklevel=2)
        kwargs[new] = kwargs.pop(old)
      return fn(*args, **kwargs)

    return wrapper

  return wrap


__all__ = ["renamed_keyword", "REMOVED_IN"]
