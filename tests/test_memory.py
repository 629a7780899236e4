"""Nothing is quadratic in memory: the compiled 1024^3 chain needs far less than 2 GiB."""

import jax
import jax.numpy as jnp
import pytest

import lowacc

N = 1024
GIB = 2 ** 30


def _bytes(fn):
  spec = jax.ShapeDtypeStruct((N, N), jnp.float32)
  m = jax.jit(fn).lower(spec, spec).compile().memory_analysis()
  return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes


@pytest.mark.parametrize('cfg', [lowacc.PAPER_M7E4, lowacc.PAPER_M7E4.replace(order='chunk')],
                         ids=['fma', 'chunk'])
def test_forward_memory(cfg):
  used = _bytes(lambda a, b: lowacc.matmul(a, b, cfg))
  # An M x N x K tensor alone would be 4 GiB; operands and output are 12 MiB.
  assert used < GIB / 8, used


@pytest.mark.parametrize('ste', ['identity', 'recursive_both'])
def test_gradient_memory(ste):
  cfg = lowacc.PAPER_M7E4.replace(ste=ste)
  used = _bytes(jax.grad(lambda a, b: jnp.sum(lowacc.matmul(a, b, cfg)), argnums=(0, 1)))
  assert used < GIB / 8, used
