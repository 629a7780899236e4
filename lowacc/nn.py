"""Flax NNX glue: the attention products as a layer, and the policy that puts accumulator configs
into an unmodified model.

Models use stock `nnx.Linear`, `nnx.LinearGeneral`, `nnx.Conv` and `nnx.Einsum`, and this module's
`Einsum` for products of two activations; all of them take their GEMM as an attribute
(`dot_general`, `conv_general_dilated`, `einsum_op`), which the policy replaces.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jax import lax


class Einsum(nnx.Module):
  """A parameter-free einsum of two activations, such as attention's QK^T and AV products.

  Unlike `nnx.Einsum` (an input times a kernel), both operands are inputs. The contraction uses
  `self.dot_general`, which the policy replaces.
  """

  def __init__(self, equation: str, dot_general=lax.dot_general):
    self.equation = equation
    self.dot_general = dot_general

  def __call__(self, a, b):
    return jnp.einsum(self.equation, a, b, _dot_general=self.dot_general,
                      precision=lax.Precision.HIGHEST)
