"""What a run keeps on disk between processes: state files written atomically, read back with a
message that names the file, and a lock that keeps two runs out of one directory."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile


class StateError(ValueError):
  """A state file (results, metrics, points, checkpoint metadata) that cannot be used; the message
  names the file and what to do."""


def write_json(path: str, obj, **dump_kwargs) -> None:
  """Writes `obj` as JSON to `path` atomically (a temporary file in the same directory, fsynced,
  then renamed over it), so a kill leaves the old file or the new one, never half of one. NaN and
  inf are refused: they are not JSON."""
  _replace(path, lambda f: json.dump(obj, f, allow_nan=False, **dump_kwargs))


def write_jsonl(path: str, rows: list) -> None:
  """Replaces the JSON-lines file `path` with `rows`, atomically as write_json."""
  _replace(path, lambda f: f.writelines(json.dumps(row, allow_nan=False) + '\n' for row in rows))


def _replace(path: str, write) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + '.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'w') as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def read_json(path: str):
  """The JSON content of `path`; a corrupt file is a StateError that names it."""
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise StateError(f'{path} is corrupt ({e}): delete it to recompute what it held') from None


def read_jsonl(path: str) -> list:
  """The rows of a JSON-lines file that is only ever appended to. A last line without its newline
  (what a kill during an append leaves) is dropped and cut from the file, so that the next append
  starts on a line of its own; a corrupt complete line is a StateError naming the file and line."""
  if not os.path.exists(path):
    return []
  with open(path, 'rb') as f:
    data = f.read()
  complete, _, partial = data.rpartition(b'\n')
  if partial:
    with open(path, 'r+b') as f:
      f.truncate(len(complete) + 1 if complete else 0)
  rows = []
  for number, line in enumerate(complete.split(b'\n') if complete else [], 1):
    try:
      rows.append(json.loads(line))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise StateError(f'{path} line {number} is corrupt ({e}): delete the file to recompute '
                       'what it held') from None
  return rows


def append_jsonl(f, row: dict) -> None:
  """Appends one row to an open JSON-lines file and flushes it (NaN and inf refused)."""
  f.write(json.dumps(row, allow_nan=False) + '\n')
  f.flush()


@contextlib.contextmanager
def lock(directory: str, what: str = '--workdir'):
  """Holds an exclusive lock on `directory` (the file .lock in it) for the block; a second holder
  is refused at once with a StateError naming the directory and the process that holds it."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, '.lock')
  f = open(path, 'a+')
  try:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or 'unknown'
      raise StateError(f'{directory} is in use by another run (pid {holder}): wait for it to '
                       f'finish, or give another {what}') from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    yield
  finally:
    f.close()


def _flatten(tree, prefix=''):
  if isinstance(tree, dict):
    out = {}
    for key in sorted(tree):
      out.update(_flatten(tree[key], f'{prefix}{key}.'))
    return out
  return {prefix[:-1]: tree}


def check_manifest(directory: str, fields: dict, fresh: str) -> None:
  """Guards a directory of results against another configuration.

  `fields` (a nested dict of JSON values) is everything that changes the directory's results. The
  first call records it in <directory>/manifest.json; a later call with other fields raises a
  StateError in one line that names the differing fields and `fresh`, how to start afresh.
  """
  path = os.path.join(directory, 'manifest.json')
  fields = json.loads(json.dumps(fields, default=str))  # the form it is stored in
  if not os.path.exists(path):
    write_json(path, fields, indent=1, sort_keys=True)
    return
  old, new = _flatten(read_json(path)), _flatten(fields)
  differ = sorted(k for k in old.keys() | new.keys() if old.get(k, '<unset>') != new.get(k, '<unset>'))
  if differ:
    shown = ', '.join(f'{k} ({old.get(k, "<unset>")!r} -> {new.get(k, "<unset>")!r})'
                      for k in differ[:6]) + (f' and {len(differ) - 6} more' if len(differ) > 6 else '')
    raise StateError(f'{directory} holds results of another configuration: {shown}; {fresh}')
