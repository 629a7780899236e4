"""NNX models as PyTorch state dicts: variable names, array layouts, and torch's BatchNorm.

A variable's torch key is its module path joined by '.', each part mapped by the model's
`module_name` (torchvision's names are the path itself; lukemelas-style EfficientNets prefix
'_'), then the variable's torch name: kernel/scale -> weight, bias, mean -> running_mean,
var -> running_var. Conv kernels are HWIO here and OIHW in torch (depthwise: (H, W, 1, C) and
(C, 1, H, W)); linear kernels (in, out) and (out, in).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

TORCH_NAMES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
               'var': 'running_var'}


def batch_norm(features: int, rngs: nnx.Rngs, *, epsilon: float = 1e-5,
               torch_momentum: float = 0.1) -> nnx.BatchNorm:
  """`nnx.BatchNorm` with torch's BatchNorm2d conventions: `epsilon` and `torch_momentum` as
  torch names them (flax's momentum is 1 - torch's), the variance computed as torch does."""
  return nnx.BatchNorm(features, momentum=1 - torch_momentum, epsilon=epsilon,
                       use_fast_variance=False, rngs=rngs)


def entries(model: nnx.Module,
            module_name: Callable[[str], str] = str) -> dict[str, nnx.Variable]:
  """The model's variables by torch state-dict key."""
  out = {}
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, nnx.Variable):
      continue
    if path[-1] not in TORCH_NAMES:
      raise ValueError(f'torch mapping: variable {".".join(map(str, path))} has no torch '
                       f'name; known variable names are {tuple(TORCH_NAMES)}')
    parts = [module_name(str(p)) for p in path[:-1]]
    out['.'.join(parts + [TORCH_NAMES[path[-1]]])] = node
  return out


def to_torch_layout(a):
  """HWIO conv kernel -> OIHW, (in, out) linear kernel -> (out, in); vectors unchanged."""
  return a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T if a.ndim == 2 else a


def from_torch_layout(a):
  return a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T if a.ndim == 2 else a


def torch_shape(shape: Sequence[int]) -> tuple[int, ...]:
  """The shape `to_torch_layout` gives an array of `shape`."""
  if len(shape) == 4:
    return tuple(shape[d] for d in (3, 2, 0, 1))
  return tuple(shape[::-1]) if len(shape) == 2 else tuple(shape)


def shapes(variables: Mapping[str, nnx.Variable]) -> dict[str, tuple[int, ...]]:
  """Torch key -> the variable's shape in torch's layout."""
  return {key: torch_shape(var.shape) for key, var in variables.items()}


def assign(variables: Mapping[str, nnx.Variable], tensors: Mapping[str, np.ndarray]) -> None:
  """Sets each variable to its tensor (torch layout), copied and cast to the variable's dtype.
  The caller has checked that keys and shapes match."""
  for key, var in variables.items():
    # A copy: on the CPU, jnp.asarray would alias the caller's (mutable) numpy buffer.
    var.set_value(jnp.array(from_torch_layout(np.asarray(tensors[key])), var.dtype, copy=True))
