"""The optional parts of lowacc and the pip extra that installs each one's packages (setup.cfg)."""

from __future__ import annotations

import importlib.util


def require(part: str, extra: str, modules: tuple[str, ...]) -> None:
  """Raises ImportError, in one line naming the extra to install, where a module is missing."""
  missing = [name for name in modules if importlib.util.find_spec(name) is None]
  if missing:
    raise ImportError(f"{part} needs {', '.join(missing)} (not installed): "
                      f"pip install 'lowacc[{extra}]'")
