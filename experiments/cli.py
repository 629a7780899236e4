"""The command lines' common entry: a user's mistake (a bad flag, config or path) prints one line
and exits with status 2, a Ctrl-C one line and status 130; a bug keeps its traceback."""

from __future__ import annotations

import os
import sys
import tempfile

from absl import app, flags

# What bad input raises: configs and formats (ValueError, StateError), missing or unwritable paths.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError)


def run(main) -> None:
  """absl's app.run(main), with bad flags, user errors and interrupts reported in one line."""
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

  def parse_flags(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:  # ml_collections puts a config file's traceback into the message
      lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
      print(f'{prog}: error: {" ".join(lines[:1] + lines[1:][-1:])}', file=sys.stderr)
      sys.exit(2)

  app.run(guarded, flags_parser=parse_flags)


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
