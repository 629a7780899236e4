"""What `lowacc.simulate` and vmap cost: ratios between two ways of running the same simulated
computation, measured in the same run, with float32 XLA alongside. `ratio` compares best wall
times, as the other benchmarks do; `cpu_ratio` best CPU times (time.process_time), which on a
machine shared with other jobs vary less: compare both with the control row.

- ResNet-18 (32x32 inputs, batch 32) training step, CHUNK (M7E4, chunk 16) in every GEMM: the
  unmodified model under `lowacc.simulate` against the model hand-wired by `apply_policy`.
- The native kernel under vmap: `jax.vmap` of `lowacc.dot_general` over a batch of GEMMs against
  the same GEMMs as one batched `lowacc.dot_general` (the kernel folds the vmapped axis into its
  batch: one call).

python -m benchmarks.bench_simulate
"""

import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lowacc
from benchmarks.bench_core import CHUNK, best_times, machine
from lowacc.models import resnet
from lowacc.nn import Policy, apply_policy


def _loss(model, batch):
  """Cross-entropy and the BatchNorm statistics the step updates (returned, so that a traced
  function keeps them)."""
  logits = model(batch['image'])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
  return loss, nnx.state(model, nnx.BatchStat)


def _step(graphdef, loss):
  """A compiled SGD step of `loss(model, batch)` on the model `graphdef` holds."""
  @jax.jit
  def step(params, rest, batch):
    # copy: new Variables, which BatchNorm may update inside the differentiated function
    (value, stats), grads = jax.value_and_grad(
        lambda p: loss(nnx.merge(graphdef, p, rest, copy=True), batch), has_aux=True)(params)
    return value, jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads), stats
  return step


def _equal(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(jax.device_get(a)),
                                                  jax.tree.leaves(jax.device_get(b))))


def _same_program(f, g, *args) -> bool:
  """Whether two jitted functions compile to the same executable: the same computations, in
  the compiled HLO without its source locations (metadata and the tables of file names), its
  instructions and computations renamed in order of appearance (XLA numbers them by how many it
  made while tracing, which differs between two routes to one program)."""
  def text(fn):
    hlo = fn.lower(*args).compile().as_text()
    lines = [re.sub(r', metadata=\{[^}]*\}', '', line) for line in hlo.splitlines()
             if line.startswith(('%', 'ENTRY', ' ', '}'))]
    names = {}
    rename = lambda m: names.setdefault(m.group(0), f'%v{len(names)}')
    return [re.sub(r'%[\w.\-]+', rename, line) for line in lines]
  return text(f) == text(g)


def resnet18_simulate_step():
  """simulate against apply_policy, and apply_policy against a second compile of itself: the
  control, which shows how far two runs of one program differ on this machine. Both steps must
  give the same bits; `same_program` says whether they compile to the same executable."""
  model = resnet.resnet18(num_classes=10, stem='cifar', rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  batch = dict(image=rng.standard_normal((32, 32, 32, 3)).astype(np.float32),
               label=rng.integers(0, 10, 32))
  policy = Policy.everywhere(CHUNK)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  wired = nnx.clone(model)
  apply_policy(wired, policy)
  wired_graphdef, _, _ = nnx.split(wired, nnx.Param, ...)
  args = (params, rest, batch)
  steps = {'float32': _step(graphdef, _loss), 'apply_policy': _step(wired_graphdef, _loss),
           'simulate': _step(graphdef, lowacc.simulate(_loss, policy)),
           'apply_policy again': _step(wired_graphdef, _loss)}
  if not _equal(steps['simulate'](*args), steps['apply_policy'](*args)):
    raise AssertionError('the simulated step differs from the hand-wired one')
  same = _same_program(steps['simulate'], steps['apply_policy'], *args)
  calls = {name: (step, args) for name, step in steps.items()}
  t = best_times(calls, repeats=6)
  cpu = best_times(calls, repeats=4, clock=time.process_time)
  name = 'resnet18 32x32 b32 step chunk'
  return {f'{name}, simulate / apply_policy': dict(
              ratio=t['simulate'] / t['apply_policy'],
              cpu_ratio=cpu['simulate'] / cpu['apply_policy'], same_program=same),
          f'{name}, apply_policy / itself (control)': dict(
              ratio=t['apply_policy again'] / t['apply_policy'],
              cpu_ratio=cpu['apply_policy again'] / cpu['apply_policy']),
          f'{name}, apply_policy / float32': dict(ratio=t['apply_policy'] / t['float32']),
          f'{name}, simulate / float32': dict(ratio=t['simulate'] / t['float32'])}


def vmapped_native_gemm(batch=16, n=256):
  """`batch` GEMMs n^3 with CHUNK (the native kernel on the CPU); both give the same bits."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, n, n)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((batch, n, n)), jnp.float32)
  one = (((1,), (0,)), ((), ()))
  batched = (((2,), (1,)), ((0,), (0,)))
  calls = {'float32': jax.jit(lambda a, b: jax.lax.dot_general(a, b, batched)),
           'batched': jax.jit(lambda a, b: lowacc.dot_general(a, b, batched, CHUNK)),
           'vmap': jax.jit(jax.vmap(lambda a, b: lowacc.dot_general(a, b, one, CHUNK)))}
  if not _equal(calls['vmap'](x, w), calls['batched'](x, w)):
    raise AssertionError('the vmapped GEMMs differ from the batched call')
  same = _same_program(calls['vmap'], calls['batched'], x, w)
  timed = {name: (fn, (x, w)) for name, fn in calls.items()}
  t = best_times(timed, repeats=8)
  cpu = best_times(timed, repeats=8, clock=time.process_time)
  name = f'{batch} x gemm{n} chunk fwd'
  return {f'{name}, vmap / batched': dict(ratio=t['vmap'] / t['batched'],
                                          cpu_ratio=cpu['vmap'] / cpu['batched'],
                                          same_program=same),
          f'{name}, batched / float32': dict(ratio=t['batched'] / t['float32'])}


def run():
  return {**resnet18_simulate_step(), **vmapped_native_gemm()}


if __name__ == '__main__':
  print(f'machine: {machine()}')
  for name, r in run().items():
    extra = ''.join(f'  {k} {v:.3f}' if isinstance(v, float) else f'  {k} {v}'
                    for k, v in r.items() if k != 'ratio')
    print(f'{name:<52} {r["ratio"]:>8.3f}{extra}')
