"""The command lines' common entry: a user's mistake prints one line and exits with status 2, a
Ctrl-C one line and status 130; a bug keeps its traceback."""

from __future__ import annotations

import os
import sys
import tempfile

from absl import app

# What bad input raises: configs and formats (ValueError, StateError), missing or unwritable paths.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError)


def run(main) -> None:
  """absl's app.run(main), with user errors and interrupts reported in one line."""
  prog = os.path.basename(sys.argv[0]) if sys.argv else 'lowacc'

  def guarded(argv):
    try:
      return main(argv)
    except KeyboardInterrupt:
      print(f'{prog}: interrupted', file=sys.stderr)
      sys.exit(130)
    except USER_ERRORS as e:
      print(f'{prog}: error: {e}', file=sys.stderr)
      sys.exit(2)

  app.run(guarded)


def integers(flag: str, values) -> list[int]:
  """A list flag's values as integers; anything else is a ValueError naming the flag."""
  try:
    return [int(v) for v in values]
  except ValueError:
    raise ValueError(f"--{flag}={','.join(map(str, values))}: expected a list of integers, "
                     'e.g. 4,5,6') from None


def writable(flag: str, prefix: str) -> None:
  """Refuses an output prefix whose directory cannot be created or written, naming the flag."""
  directory = os.path.dirname(os.path.abspath(prefix))
  try:
    os.makedirs(directory, exist_ok=True)
    tempfile.TemporaryFile(dir=directory).close()
  except OSError as e:
    raise ValueError(f'--{flag}={prefix}: cannot write there ({e.strerror}: {e.filename})') \
        from None
