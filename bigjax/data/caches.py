"""Where bigjax writes what it derives from a dataset (trained tokenizers, packed token stores).

Beside the data when that folder can be written, so every run on it (and every process of a run)
finds the same files; else the same path under the user's cache folder, as a read-only dataset
mount (a cluster's shared copy of ImageNet or C4) cannot hold them.
"""

from __future__ import annotations

import os
import tempfile

from absl import logging


def home() -> str:
  """The user's cache folder for bigjax: $XDG_CACHE_HOME/bigjax (default ~/.cache/bigjax)."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'bigjax')


def writable(directory: str) -> str:
  """`directory`, created, if a file can be written there; else the same absolute path under
  `home()` (created) after a one-line warning. Every process of a run picks the same folder."""
  try:
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryFile(dir=directory):
      pass
    return directory
  except OSError as e:
    fallback = os.path.join(home(), os.path.abspath(directory).lstrip(os.sep))
    logging.warning(
      '%s cannot be written (%s); keeping tokenizers and packed token stores in %s instead',
      directory,
      e.strerror or e,
      fallback,
    )
    os.makedirs(fallback, exist_ok=True)
    return fallback
