"""The text of a checkpoint/model mismatch, shared by the checkpoint importers."""

from typing import Sequence


def listing(title: str, lines: Sequence[str], limit: int = 8) -> str:
  more = f'\n    ... and {len(lines) - limit} more' if len(lines) > limit else ''
  return f'\n  {title} ({len(lines)}):\n    ' + '\n    '.join(lines[:limit]) + more


def mismatch_detail(wrong: Sequence[str], missing: Sequence[str], unused: Sequence[str],
                    layout: str) -> str:
  """Lists shapes that differ (in `layout`), parameters the checkpoint lacks and checkpoint keys
  the model lacks, at most 8 of each with their count."""
  detail = ''
  for title, lines in ((f'shapes that differ ({layout} layout)', wrong),
                       ('model parameters missing from the checkpoint', missing),
                       ('checkpoint keys the model does not have', unused)):
    if lines:
      detail += listing(title, lines)
  return detail
