"""lowacc.simulate on code lowacc did not write: every GEMM found, simulated, counted and named."""

import re
import warnings

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import lowacc
from lowacc import AccumulatorConfig, FloatFormat
from lowacc.models import bert, resnet
from lowacc.nn import apply_policy
from lowacc.policy import Policy, Rule
from lowacc.simulate import coverage, simulate
from tests.conftest import assert_bits_equal, run_on_host_devices

NARROW = AccumulatorConfig(acc=FloatFormat(3, 3, bias=3, rounding='toward_zero'), chunk_size=4)
EVERYWHERE = Policy.everywhere(NARROW)
# Wide enough that activations below 1 survive (NARROW flushes below 0.25), 4 bits of mantissa.
MODEL = AccumulatorConfig(acc=FloatFormat(4, 3, rounding='toward_zero'), chunk_size=4)
DN = (((1,), (0,)), ((), ()))
STOCHASTIC = NARROW.replace(acc=NARROW.acc.replace(rounding='stochastic'))


def gemm_count(fn, *args):
  """dot_general and conv equations of fn's float32 jaxpr, in every nested jaxpr."""
  def count(jaxpr):
    n = 0
    for eqn in jaxpr.eqns:
      n += eqn.primitive.name in ('dot_general', 'conv_general_dilated')
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        n += count(sub)
    return n
  leaves, tree = jax.tree.flatten(args)
  arrays = [i for i, leaf in enumerate(leaves) if isinstance(leaf, (jax.Array, np.ndarray))]

  def traced(*values):  # the arrays traced, other leaves (Python bools, numbers) static
    new = list(leaves)
    for i, v in zip(arrays, values):
      new[i] = v
    return fn(*jax.tree.unflatten(tree, new))

  return count(jax.make_jaxpr(traced)(*[leaves[i] for i in arrays]).jaxpr)


def check_model(fn, *args):
  """coverage lists exactly the jaxpr's GEMMs, all simulated; outputs differ from float32; a
  gradient step runs. Returns the coverage."""
  everywhere = Policy.everywhere(MODEL)
  sites = coverage(fn, everywhere, *args)
  assert len(sites) == gemm_count(fn, *args) > 0
  assert len({c.site.path for c in sites}) == len(sites)
  assert all(c.status == 'simulated' and c.config == MODEL for c in sites), sites
  y = simulate(fn, everywhere)(*args)
  assert not np.array_equal(np.asarray(y), np.asarray(fn(*args)))
  leaves, tree = jax.tree.flatten(args[0])  # a gradient step on the float parameters
  floats = [i for i, leaf in enumerate(leaves)
            if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jnp.floating)]

  def loss(params):
    new = list(leaves)
    for i, p in zip(floats, params):
      new[i] = p
    return jnp.sum(simulate(fn, everywhere)(jax.tree.unflatten(tree, new), *args[1:]) ** 2)

  grads = jax.grad(loss)([leaves[i] for i in floats])
  assert all(np.isfinite(g).all() for g in grads) and any(np.any(g != 0) for g in grads)
  return sites


@pytest.fixture
def xw(rng):
  return (rng.standard_normal((4, 8)).astype(np.float32),
          rng.standard_normal((8, 8)).astype(np.float32))


# ------------------------------------------------------------------ control flow and custom rules

@jax.custom_vjp
def doubled_grad(x, w):
  return x @ w


doubled_grad.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (2 * g @ r[1].T, r[0].T @ g))


def control_flow(x, w):
  y = doubled_grad(x, w)
  y = jax.checkpoint(lambda y: y @ w)(y)
  y = lax.cond(y.sum() > 0, lambda y: y @ w, lambda y: y @ w.T, y)
  y, _ = lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), y, jnp.stack([w, 2 * w]))
  return y


def wired_dot(cfg, key):
  """lowacc.dot_general as site `site` of coverage's list, in iteration `loops` of its loops."""
  def dot(a, b, site, *loops):
    if key is not None:
      k = jax.random.fold_in(key, site)
      for i in loops:
        k = jax.random.fold_in(k, i)
    return lowacc.dot_general(a, b, DN, cfg, key=None if key is None else k)
  return dot


def control_flow_by_hand(x, w, cfg, key=None):
  dot = wired_dot(cfg, key)

  @jax.custom_vjp
  def custom(x, w):
    return dot(x, w, 0)

  custom.defvjp(lambda x, w: (dot(x, w, 0), (x, w)), lambda r, g: (2 * g @ r[1].T, r[0].T @ g))
  y = custom(x, w)
  y = jax.checkpoint(lambda y: dot(y, w, 1))(y)
  # (cond's jaxpr holds the false branch first, so coverage lists it first)
  y = lax.cond(y.sum() > 0, lambda y: dot(y, w, 3), lambda y: dot(y, w.T, 2), y)
  y, _ = lax.scan(lambda c, xi: (jnp.tanh(dot(c, xi[0], 4, xi[1])), None), y,
                  (jnp.stack([w, 2 * w]), jnp.arange(2)))
  return y


def test_scan_cond_checkpoint_and_custom_vjp_are_simulated_with_the_custom_rule(xw):
  x, w = xw
  sites = coverage(control_flow, EVERYWHERE, x, w)
  assert len(sites) == gemm_count(control_flow, x, w) == 5
  assert [c.site.role for c in sites] == ['activation'] * 5  # bare arguments are activations
  sim = simulate(control_flow, EVERYWHERE)
  assert_bits_equal(sim(x, w), control_flow_by_hand(x, w, NARROW), 'forward')
  assert_bits_equal(jax.jit(sim)(x, w), control_flow_by_hand(x, w, NARROW), 'forward, jit')
  loss = lambda f: lambda x, w: jnp.sum(f(x, w) ** 2)  # noqa: E731
  for ste in ('identity', 'recursive_of'):
    cfg = NARROW.replace(ste=ste)
    got = jax.grad(loss(simulate(control_flow, Policy.everywhere(cfg))), (0, 1))(x, w)
    want = jax.grad(loss(lambda x, w: control_flow_by_hand(x, w, cfg)), (0, 1))(x, w)
    for g, e in zip(got, want):
      assert_bits_equal(g, e, f'gradient under {ste}')
  # Counted inside each of them, under jit and grad alike.
  custom, remat, then, other, scan = (c.site.path for c in sites)
  counted = simulate(control_flow, EVERYWHERE, stats=True)
  grads, stats = jax.jit(jax.grad(lambda x, w: (jnp.sum(counted(x, w)[0] ** 2), counted(x, w)[1]),
                                  (0, 1), has_aux=True))(x, w)
  calls = {path: int(s['calls']) for path, s in stats.items()}
  assert calls[custom] == calls[remat] == calls[then] + calls[other] == 1 and calls[scan] == 2
  want = lowacc.accumulation_stats(x, w, DN, NARROW)
  for k, v in want.items():
    assert np.asarray(stats[custom][k]) == np.asarray(v), k
  plain = jax.jit(jax.grad(loss(simulate(control_flow, EVERYWHERE)), (0, 1)))(x, w)
  for g, e in zip(grads, plain):  # both compiled: XLA rounds fused float32 ops its own way
    assert_bits_equal(g, e, 'gradient with counters')
  # float32 everywhere is the function itself, gradients (the custom rule's 2x) included (both
  # compiled: XLA's fusions round differently from op-by-op dispatch).
  grad = lambda f: jax.jit(jax.grad(loss(f), (0, 1)))  # noqa: E731
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    for g, e in zip(grad(simulate(control_flow, Policy(())))(x, w), grad(control_flow)(x, w)):
      assert_bits_equal(g, e, 'float32 gradient with the custom rule')


@jax.custom_jvp
def tripled_tangent(x, w):
  return x @ w


tripled_tangent.defjvp(lambda p, t: (p[0] @ p[1], 3 * (t[0] @ p[1] + p[0] @ t[1])))


def loops(x, w, while_loop=True):
  """Site 0 in a custom_jvp, 1 in a fori_loop (a scan), 2 in a while loop (which has no reverse
  mode, hence the flag), then one in a fori_loop inside a scan."""
  y = tripled_tangent(x, w)
  y = lax.fori_loop(0, 2, lambda i, c: jnp.tanh(c @ w), y)
  if while_loop:
    y, _ = lax.while_loop(lambda c: c[1] < 2, lambda c: (jnp.tanh(c[0] @ w), c[1] + 1), (y, 0))
  inner = lambda c, wi: lax.fori_loop(0, 2, lambda i, c: jnp.tanh(c @ wi), c)  # noqa: E731
  y, _ = lax.scan(lambda c, wi: (inner(c, wi), None), y, jnp.stack([w, -w, w]))
  return y


def loops_by_hand(x, w, cfg, key, while_loop=True):
  dot = wired_dot(cfg, key)

  @jax.custom_jvp
  def custom(x, w):
    return dot(x, w, 0)

  custom.defjvp(lambda p, t: (dot(p[0], p[1], 0), 3 * (t[0] @ p[1] + p[0] @ t[1])))
  y = custom(x, w)
  y = lax.fori_loop(0, 2, lambda i, c: jnp.tanh(dot(c, w, 1, i)), y)
  if while_loop:
    y, _ = lax.while_loop(lambda c: c[1] < 2,
                          lambda c: (jnp.tanh(dot(c[0], w, 2, c[1])), c[1] + 1), (y, 0))

  def layer(c, xi):
    wi, j = xi
    return lax.fori_loop(0, 2, lambda i, c: jnp.tanh(dot(c, wi, 2 + while_loop, j, i)), c), None

  y, _ = lax.scan(layer, y, (jnp.stack([w, -w, w]), jnp.arange(3)))
  return y


def test_stochastic_rounding_takes_a_key_folded_per_site_and_iteration(xw):
  x, w = xw
  policy = Policy.everywhere(STOCHASTIC)
  assert len(coverage(loops, policy, x, w)) == gemm_count(loops, x, w) == 4
  key = jax.random.key(7)
  sim = simulate(loops, policy)
  want = loops_by_hand(x, w, STOCHASTIC, key)
  assert_bits_equal(sim(x, w, key=key), want, 'stochastic, eager')
  assert_bits_equal(jax.jit(sim)(x, w, key=key), want, 'stochastic, jit')
  assert not np.array_equal(sim(x, w, key=jax.random.key(8)), want)  # the key matters
  loss = lambda f: lambda x, w: jnp.sum(f(x, w) ** 2)  # noqa: E731
  for fn, by_hand in ((lambda x, w: loops(x, w, False),
                       lambda x, w: loops_by_hand(x, w, STOCHASTIC, key, False)),
                      (control_flow, lambda x, w: control_flow_by_hand(x, w, STOCHASTIC, key))):
    got = jax.grad(loss(lambda x, w: simulate(fn, policy)(x, w, key=key)), (0, 1))(x, w)
    for g, e in zip(got, jax.grad(loss(by_hand), (0, 1))(x, w)):
      assert_bits_equal(g, e, 'stochastic, gradient')
  with pytest.raises(ValueError, match=r"site '.*' rounds stochastically .* pass key="):
    sim(x, w)
  with pytest.raises(ValueError, match='not a jax PRNG key'):
    sim(x, w, key=7)


def test_counters_equal_accumulation_stats_eager_jit_scan_and_vmap(xw):
  x, w = xw
  stack = jnp.stack([w, 2 * w, -w])

  def fn(x, ws):
    y, _ = lax.scan(lambda c, wi: (c @ wi, None), x, ws)
    return jnp.einsum('mk,kn->mn', y, ws[0])

  sim = simulate(fn, EVERYWHERE, stats=True)
  (y, eager), (_, jitted) = sim(x, stack), jax.jit(sim)(x, stack)
  assert jax.tree.map(lambda a, b: np.array_equal(a, b), eager, jitted) == jax.tree.map(
      lambda _: True, eager)
  scan_path, last_path = [c.site.path for c in coverage(fn, EVERYWHERE, x, stack)]
  h, calls = x, []
  for wi in stack:
    calls.append(lowacc.accumulation_stats(h, wi, DN, NARROW))
    h = lowacc.dot_general(h, wi, DN, NARROW)
  for name in ('steps', 'sat', 'lost', 'flush'):
    assert int(eager[scan_path][name]) == sum(int(c[name]) for c in calls), name
  assert float(eager[scan_path]['max_abs_error']) == max(float(c['max_abs_error']) for c in calls)
  assert int(eager[scan_path]['calls']) == 3
  last = lowacc.accumulation_stats(h, stack[0], DN, NARROW)
  for name in ('steps', 'sat', 'lost', 'flush', 'max_abs_error', 'rel_error'):
    assert np.asarray(eager[last_path][name]) == np.asarray(last[name]), name
  assert int(eager[scan_path]['sat']) > 0
  # A vmapped GEMM is one batched GEMM: its counters sum over the batch.
  xs = jnp.stack([x, -2 * x])
  vy, vstats = simulate(jax.vmap(lambda x: x @ w), EVERYWHERE, stats=True)(xs)
  (path,) = vstats
  per_example = [lowacc.accumulation_stats(xi, w, DN, NARROW) for xi in xs]
  for name in ('steps', 'sat', 'lost', 'flush'):
    assert int(vstats[path][name]) == sum(int(s[name]) for s in per_example), name
  assert_bits_equal(vy, jnp.stack([lowacc.dot_general(xi, w, DN, NARROW) for xi in xs]), 'vmap')


def test_rules_match_path_role_kind_and_shapes_and_unmatched_sites_warn(xw):
  x, w = xw
  params = {'w': w}

  def fn(params, x):
    with jax.named_scope('proj'):
      h = x @ params['w']
    with jax.named_scope('attn'):
      return h.T @ h

  policy = Policy((Rule('proj', None), Rule('.*', NARROW, role='activation')))
  sites = {c.site.path: c for c in coverage(fn, policy, params, x)}
  assert sorted(sites) == ['attn', 'proj']
  assert (sites['proj'].site.role, sites['proj'].status) == ('weight', 'float32 (rule)')
  assert (sites['attn'].site.role, sites['attn'].status) == ('activation', 'simulated')
  by_k = Policy((Rule('.*', NARROW, when=lambda s: s.contraction >= 8),))
  assert [c.status for c in coverage(fn, by_k, params, x)] == ['simulated',
                                                              'float32 (no rule matched)']
  with pytest.warns(UserWarning, match='stay float32 by no explicit rule: attn'):
    simulate(fn, by_k)(params, x)
  with pytest.raises(ValueError, match='role'):
    Rule('.*', NARROW, role='kernel')


def test_a_jitted_helper_called_twice_is_two_sites(xw):
  x, w = xw
  helper = jax.jit(lambda a, b: a @ b)  # both calls trace to one cached jaxpr
  fn = lambda x, w: helper(helper(x, w), w)  # noqa: E731
  paths = [c.site.path for c in coverage(fn, EVERYWHERE, x, w)]
  assert len(paths) == gemm_count(fn, x, w) == 2 and paths[1] == paths[0] + '#2'
  _, stats = simulate(fn, EVERYWHERE, stats=True)(x, w)
  assert sorted(stats) == sorted(paths)
  by_hand = lowacc.dot_general(lowacc.dot_general(x, w, DN, NARROW), w, DN, NARROW)
  assert_bits_equal(simulate(fn, EVERYWHERE)(x, w), by_hand, 'helper twice')
  # Inside a scan whose carry starts as a parameter: the body is analysed twice.
  def looped(params, x):
    return lax.scan(lambda c, _: (helper(c, x), None), params['w'], None, length=2)[0]

  (site,) = coverage(looped, EVERYWHERE, {'w': w}, w)
  assert (site.site.role, site.status) == ('activation', 'simulated')
  by_hand = lowacc.dot_general(lowacc.dot_general(w, w, DN, NARROW), w, DN, NARROW)
  assert_bits_equal(simulate(looped, EVERYWHERE)({'w': w}, w), by_hand, 'jit inside scan')
  first_only = Policy((Rule(f'^{re.escape(paths[0])}$', NARROW), Rule('.*', None)))
  assert_bits_equal(simulate(fn, first_only)(x, w), lowacc.dot_general(x, w, DN, NARROW) @ w,
                    'first call only')


def test_bf16_and_f16_gemms_are_simulated_and_keep_their_dtype(rng):
  x = jnp.asarray(rng.standard_normal((4, 8)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((8, 8)), jnp.bfloat16)
  h = x.astype(jnp.float16)
  fns = {  # each a dot_general whose equation gives preferred_element_type=bf16 or f16
      'einsum': (lambda x, w: jnp.einsum('mk,kn->mn', x, w), (x, w), jnp.bfloat16),
      'matmul': (lambda x, w: jnp.matmul(x, w, preferred_element_type=jnp.bfloat16), (x, w),
                 jnp.bfloat16),
      'f16': (lambda h, w: h @ w.astype(jnp.float16), (h, w), jnp.float16)}
  for name, (fn, args, dtype) in fns.items():
    (site,) = coverage(fn, EVERYWHERE, *args)
    assert site.status == 'simulated', (name, site.status)
    y = simulate(fn, EVERYWHERE)(*args)
    a, b = args
    want = lowacc.dot_general(a, b.astype(a.dtype), DN, NARROW, preferred_element_type=dtype)
    assert y.dtype == want.dtype == dtype, name
    assert_bits_equal(y, want, name)
  # A bf16 nnx.Linear (float32 parameters, bf16 compute) against the same layer wired by hand.
  def layer(dot):
    return nnx.Linear(8, 8, dtype=jnp.bfloat16, preferred_element_type=jnp.bfloat16,
                      dot_general=dot, rngs=nnx.Rngs(0))

  fn = lambda model, x: model(x)  # noqa: E731
  model, wired = layer(lax.dot_general), layer(lowacc.DotGeneral(MODEL))
  xf = x.astype(jnp.float32)
  (site,) = coverage(fn, Policy.everywhere(MODEL), model, xf)
  assert site.status == 'simulated' and site.site.role == 'weight'
  y = simulate(fn, Policy.everywhere(MODEL))(model, xf)
  assert y.dtype == jnp.bfloat16
  assert_bits_equal(y, wired(xf), 'bf16 nnx.Linear')
  loss = lambda f: lambda x: jnp.sum(f(x).astype(jnp.float32) ** 2)  # noqa: E731
  assert_bits_equal(jax.grad(loss(lambda x: simulate(fn, Policy.everywhere(MODEL))(model, x)))(xf),
                    jax.grad(loss(wired))(xf), 'bf16 nnx.Linear, gradient')


# ------------------------------------------------------------------ models lowacc did not write

class Attention(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(11, 8, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(2, 8, qkv_features=8, decode=False, rngs=rngs)
    self.up = nnx.ConvTranspose(8, 4, (3,), strides=(2,), rngs=rngs)

  def __call__(self, tokens):
    h = self.attn(self.embed(tokens))
    return self.up(h).sum(-1) + self.embed.attend(h).sum(-1).repeat(2, axis=-1)


def test_nnx_attention_embed_attend_and_conv_transpose():
  model = Attention(nnx.Rngs(0))
  tokens = jnp.array([[1, 2, 3, 4], [5, 6, 7, 10]])
  fn = lambda model, tokens: model(tokens)  # noqa: E731
  sites = {c.site.path: c.site for c in check_model(fn, model, tokens)}
  assert {'attn/query', 'attn/key', 'attn/value', 'attn/out', 'up', 'embed'} <= set(sites)
  assert sites['attn/query'].role == sites['embed'].role == sites['up'].role == 'weight'
  products = [s for p, s in sites.items() if p.startswith('attn/') and s.role == 'activation']
  assert len(products) == 2  # QK^T and PV, addressable under the module's path
  # Hand wiring where Flax lets it: the projections' dot_general, everything else float32.
  wired = Attention(nnx.Rngs(0))
  for lin in (wired.attn.query, wired.attn.key, wired.attn.value, wired.attn.out):
    lin.dot_general = lowacc.DotGeneral(MODEL)
  policy = Policy((Rule('^attn/(query|key|value|out)$', MODEL), Rule('.*', None)))
  assert_bits_equal(simulate(fn, policy)(model, tokens), wired(tokens), 'projections only')


class Block(linen.Module):
  """A small pre-norm transformer block from flax.linen layers."""

  @linen.compact
  def __call__(self, x):
    h = linen.SelfAttention(num_heads=2, qkv_features=8)(linen.LayerNorm()(x))
    x = x + h
    h = linen.Dense(16)(linen.LayerNorm()(x))
    return x + linen.Dense(8)(linen.gelu(h))


class WiredBlock(linen.Module):
  @linen.compact
  def __call__(self, x):
    dot = lowacc.DotGeneral(MODEL)
    h = linen.SelfAttention(num_heads=2, qkv_features=8,
                            attention_fn=lambda *a, **k: linen.dot_product_attention(
                                *a, **k, einsum_dot_general=dot),
                            qkv_dot_general=dot, out_dot_general=dot)(linen.LayerNorm()(x))
    x = x + h
    h = linen.Dense(16, dot_general=dot)(linen.LayerNorm()(x))
    return x + linen.Dense(8, dot_general=dot)(linen.gelu(h))


def test_linen_transformer_block(rng):
  x = jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32)
  params = Block().init(jax.random.key(0), x)
  fn = lambda params, x: Block().apply(params, x)  # noqa: E731
  paths = [c.site.path for c in check_model(fn, params, x)]
  assert 'Block/Dense_0' in paths and 'Block/SelfAttention_0/query' in paths, paths
  assert_bits_equal(simulate(fn, Policy.everywhere(MODEL))(params, x),
                    WiredBlock().apply(params, x), 'hand-wired Linen block')


def test_equinox_model_under_vmap(rng):
  eqx = pytest.importorskip('equinox')
  keys = jax.random.split(jax.random.key(0), 3)

  class Model(eqx.Module):
    conv: eqx.nn.Conv2d
    attn: eqx.nn.MultiheadAttention
    head: eqx.nn.Linear

    def __call__(self, image):  # one (2, 6, 6) image
      h = self.conv(image).reshape(4, -1).T   # (16, 4) tokens
      h = self.attn(h, h, h)
      return jax.vmap(self.head)(h)

  model = Model(eqx.nn.Conv2d(2, 4, 3, key=keys[0]), eqx.nn.MultiheadAttention(2, 4, key=keys[1]),
                eqx.nn.Linear(4, 3, key=keys[2]))
  images = jnp.asarray(rng.standard_normal((2, 2, 6, 6)), jnp.float32)
  fn = lambda model, images: jax.vmap(model)(images)  # noqa: E731
  sites = check_model(fn, model, images)
  roles = [c.site.role for c in sites]
  assert roles.count('activation') == 2 and roles.count('weight') == len(sites) - 2


# ------------------------------------------------------------------ lowacc's own ResNet

def test_resnet_equals_apply_policy_forward_and_gradients(rng):
  def build():
    model = resnet.ResNet(resnet.BasicBlock, (1, 1, 1, 1), num_classes=3, stem='cifar',
                          in_channels=1, width=2, rngs=nnx.Rngs(0))
    model.eval()
    return model

  x = jnp.asarray(rng.standard_normal((1, 4, 4, 1)), jnp.float32)
  for ste in ('identity', 'recursive_of'):
    policy = Policy.everywhere(MODEL.replace(ste=ste), skip=('^conv1$',))
    wired = build()
    apply_policy(wired, policy)
    graphdef, state = nnx.split(wired)
    plain_graphdef, _ = nnx.split(build())
    loss_wired = lambda state, x: jnp.sum(nnx.merge(graphdef, state)(x) ** 2)  # noqa: E731
    simulated = simulate(lambda model, x: jnp.sum(model(x) ** 2), policy)
    loss_sim = lambda state, x: simulated(nnx.merge(plain_graphdef, state), x)  # noqa: E731
    # Under jit: one compile per side instead of one per primitive (eager took two minutes).
    assert_bits_equal(jax.jit(loss_sim)(state, x), jax.jit(loss_wired)(state, x),
                      f'forward, {ste}')
    got = jax.jit(jax.grad(loss_sim, (0, 1)))(state, x)
    want = jax.jit(jax.grad(loss_wired, (0, 1)))(state, x)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert_bits_equal(g, e, f'gradient, {ste}')


# ------------------------------------------------------------------ shard_map

SHARD_MAP_CHECK = '''
import re
import jax, jax.numpy as jnp, numpy as np, lowacc
from jax import lax
from jax.sharding import AxisType, PartitionSpec as P
from lowacc.policy import Policy, Rule
from lowacc.simulate import coverage, simulate
from tests.conftest import assert_bits_equal
from tests.test_simulate import DN, NARROW, STOCHASTIC
mesh = jax.make_mesh((2,), ('d',), axis_types=(AxisType.Auto,))
rng = np.random.default_rng(0)
x, u = 4 * rng.standard_normal((8, 16), np.float32), rng.standard_normal((16, 16), np.float32)
w, v = rng.standard_normal((16, 4), np.float32), rng.standard_normal((4, 16), np.float32)


def model(dot, check_vma):
  """Site 0 outside the shard_map; inside, site 1 split over x's rows, site 2 on replicated
  operands only, site 3 in a scan (split)."""
  def body(key, x, w):
    h = jnp.tanh(dot(key, x, w, 1))
    g = dot(key, v, w, 2) / 2
    return lax.scan(lambda c, i: (jnp.tanh(dot(key, c, g, 3, i)), None), h, jnp.arange(2))[0]

  def fn(x, w, key=None):
    return jax.shard_map(body, mesh=mesh, in_specs=(P(), P('d'), P()), out_specs=P('d'),
                         check_vma=check_vma)(key, dot(key, x, u, 0), w)
  return fn


def plain(key, a, b, site, *loops):
  return a @ b


def wired(configs):
  """lowacc.dot_general by hand, site i under configs[i] with the key simulate gives it (and its
  loop iteration)."""
  def dot(key, a, b, site, *loops):
    if key is not None:
      key = jax.random.fold_in(key, site)
      for i in loops:
        key = jax.random.fold_in(key, i)
    return lowacc.dot_general(a, b, DN, configs[site], key=key)
  return dot


def forward_and_grads(f, key):
  loss = lambda x, w: jnp.sum(f(x, w, key=key) ** 2)
  return jax.jit(lambda x, w: (f(x, w, key=key), jax.grad(loss, (0, 1))(x, w)))(x, w)


# Each site's counters, of the whole GEMMs and of each shard's (rows 0-3, 4-7 of x).
dot = wired([NARROW] * 4)
def calls_of(x1):
  h, g = jnp.tanh(dot(None, x1, w, 1)), dot(None, v, w, 2) / 2
  out = [[lowacc.accumulation_stats(x1, w, DN, NARROW)],
         [lowacc.accumulation_stats(v, w, DN, NARROW)], []]
  for i in range(2):
    out[2].append(lowacc.accumulation_stats(h, g, DN, NARROW))
    h = jnp.tanh(dot(None, h, g, 3))
  return out
x1 = dot(None, x, u, 0)
first, whole, shards = (lowacc.accumulation_stats(x, u, DN, NARROW), calls_of(x1),
                        (calls_of(x1[:4]), calls_of(x1[4:])))
key = jax.random.key(3)
for check_vma in (True, False):
  fn = model(plain, check_vma)
  sites = coverage(fn, Policy.everywhere(NARROW), x, w)
  # Per-shard shapes inside the shard_map.
  assert [c.site.lhs_shape for c in sites] == [(8, 16), (4, 16), (4, 16), (4, 4)], sites
  assert [c.status for c in sites] == ['simulated'] * 4, sites
  paths = [c.site.path for c in sites]
  # Forward and gradients under jit: identity everywhere; then (with check_vma, to keep it
  # short) stochastic rounding at sites 1 and 3 (the key enters the shard_map) and a recursive
  # estimator at sites 0 and 2.
  mixed = [NARROW.replace(ste='recursive_both'), STOCHASTIC] * 2
  policy = Policy(tuple(Rule(f'^{re.escape(p)}$', c) for p, c in zip(paths, mixed)))
  for configs, policy, k in [([NARROW] * 4, Policy.everywhere(NARROW), None)] + [
      (mixed, policy, key)] * check_vma:
    counted = simulate(fn, policy, stats=True)
    got = forward_and_grads(lambda x, w, key: counted(x, w, key=key)[0], k)
    want = forward_and_grads(model(wired(configs), check_vma), k)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert_bits_equal(g, e, f'check_vma={check_vma}, {configs}')
  # Counters: steps, sat, lost, flush and calls those of the whole GEMMs (site 2's counted once,
  # not on each shard), under jit and eagerly.
  counted = simulate(fn, Policy.everywhere(NARROW), stats=True)
  runs = {'jit': jax.jit(counted)(x, w)[1]}
  if check_vma:  # (eagerly once: op by op on each shard is slow)
    y, runs['eager'] = counted(x, w)
    assert_bits_equal(y, forward_and_grads(model(wired([NARROW] * 4), check_vma), None)[0],
                      'eager')
  for run, stats in runs.items():
    for name in ('steps', 'sat', 'lost', 'flush', 'calls'):
      assert int(stats[paths[0]][name]) == int(first.get(name, 1)), (run, name)
      for p, calls in zip(paths[1:], whole):
        want = len(calls) if name == 'calls' else sum(int(c[name]) for c in calls)
        assert int(stats[p][name]) == want, (run, p, name)
    assert int(stats[paths[1]]['sat']) > 0
  if not check_vma:
    continue
  # max_abs_error the largest of the shards', rel_error their mean (over calls too); each
  # compares with a float32 dot of that shard's operands, rounded as XLA rounds it (eagerly).
  eager = runs['eager']
  for i, p in enumerate(paths[1:]):
    per_shard = [s[i] for s in shards] if i != 1 else [whole[i]]
    assert float(eager[p]['max_abs_error']) == max(float(c['max_abs_error'])
                                                   for s in per_shard for c in s), p
    mean = np.mean([np.mean([float(c['rel_error']) for c in s]) for s in per_shard])
    np.testing.assert_allclose(float(eager[p]['rel_error']), mean, rtol=1e-6, err_msg=p)
print('ok')
'''


def test_shard_map_is_simulated_and_counted_per_whole_gemm():
  run_on_host_devices(SHARD_MAP_CHECK)  # one subprocess: one set of compiles


# ------------------------------------------------------------------ lowacc's own BERT

def test_bert_equals_apply_policy_forward_and_gradients(rng):
  """Every GEMM, attention's QK^T and PV included: simulate's sites are apply_policy's layers
  (same paths, same roles), and the two give the same bits, forward and gradients."""
  config = bert.BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=16, max_position_embeddings=8)

  def build():
    model = bert.BertForSequenceClassification(config, 2, rngs=nnx.Rngs(0))
    model.eval()
    return model

  ids = jnp.asarray(rng.integers(0, 16, (2, 4)), jnp.int32)
  mask = jnp.asarray([[1, 1, 1, 1], [1, 1, 1, 0]], jnp.int32)  # a padded key: the mask bias
  for ste in ('identity', 'recursive_both'):
    policy = Policy.everywhere(MODEL.replace(ste=ste))
    wired = build()
    assigned = apply_policy(wired, policy)
    graphdef, params, rest = nnx.split(wired, nnx.Param, ...)  # rest: dropout's rng state
    plain_graphdef, _, _ = nnx.split(build(), nnx.Param, ...)
    loss = lambda model, ids, mask: jnp.sum(model(ids, mask) ** 2)  # noqa: E731
    sites = coverage(loss, policy, build(), ids, mask)
    assert {c.site.path: c.config for c in sites} == assigned
    assert all(c.status == 'simulated' for c in sites)
    roles = {c.site.path: c.site.role for c in sites}
    assert [p for p, r in roles.items() if r == 'activation'] == [
        'bert/encoder/layer/0/attention/self/qk', 'bert/encoder/layer/0/attention/self/pv']
    loss_wired = lambda params, ids, mask: loss(  # noqa: E731
        nnx.merge(graphdef, params, rest), ids, mask)
    simulated = simulate(loss, policy)
    loss_sim = lambda params, ids, mask: simulated(  # noqa: E731
        nnx.merge(plain_graphdef, params, rest), ids, mask)
    # One compile per side and estimator: value_and_grad gives the forward and the gradients.
    (got_loss, got), (want_loss, want) = (jax.jit(jax.value_and_grad(f))(params, ids, mask)
                                          for f in (loss_sim, loss_wired))
    assert_bits_equal(got_loss, want_loss, f'forward, {ste}')
    assert got_loss != loss(nnx.merge(plain_graphdef, params, rest), ids, mask)  # not float32
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert_bits_equal(g, e, f'gradient, {ste}')


class _TrainMode(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(6, 5, rngs=rngs)
    self.norm = nnx.BatchNorm(5, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.out = nnx.Linear(5, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(self.drop(self.norm(self.dense(x))))


def test_nnx_state_updates_reach_the_modules(rng):
  # A train-mode model updates its batch statistics and advances its dropout RNG as it runs:
  # under simulate, as when called directly with the same GEMMs wired by hand.
  x = jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)
  policy = Policy.everywhere(MODEL)
  by_hand = _TrainMode(nnx.Rngs(0))
  apply_policy(by_hand, policy)
  simulated = lambda m, x: simulate(lambda m, x: m(x), policy)(m, x)  # noqa: E731
  direct = lambda m, x: m(x)  # noqa: E731
  for name, wrap in (('eager', lambda f: f), ('nnx.jit', nnx.jit)):
    model, wired = _TrainMode(nnx.Rngs(0)), nnx.clone(by_hand)
    for step in range(2):  # the second call sees the first's statistics and RNG count
      assert_bits_equal(wrap(simulated)(model, x), wrap(direct)(wired, x), f'{name} step {step}')
      for got, want in zip(_raw_state(model), _raw_state(wired), strict=True):
        assert np.array_equal(got, want), (name, step)
    assert not np.array_equal(model.norm.mean[...], _TrainMode(nnx.Rngs(0)).norm.mean[...])


def _raw_state(model):
  """The arrays of a model's non-parameter state (batch statistics, RNG keys and counts)."""
  raw = lambda v: jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v
  return [np.asarray(raw(v)) for v in jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param)))]
