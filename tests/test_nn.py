"""The NNX policy: rules to layers, the two-stage underflow switch, per-layer counters, Linen."""

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import lowacc
from lowacc import AccumulatorConfig, FloatFormat
from lowacc.nn import Einsum, Policy, Rule, apply_policy, layer_stats, rates
from tests.conftest import assert_bits_equal

NARROW = AccumulatorConfig(acc=FloatFormat(3, 3, bias=3, rounding='toward_zero'), chunk_size=4)


class Net(nnx.Module):
  """conv -> dense -> attention-like product -> nnx.Einsum -> dense."""

  def __init__(self, rngs):
    self.stem = nnx.Conv(2, 4, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
    self.proj = nnx.Linear(4, 8, rngs=rngs)
    self.scores = Einsum('bqd,bkd->bqk')
    self.mix = nnx.Einsum('bqk,kh->bqh', (5 * 5, 6), rngs=rngs)
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    h = self.stem(x)                      # (b, 5, 5, 4)
    h = self.proj(h.reshape(h.shape[0], 25, 4))
    s = self.scores(h, h)                 # (b, 25, 25)
    return self.head(jax.nn.relu(self.mix(s)))


@pytest.fixture
def x(rng):
  return rng.standard_normal((2, 5, 5, 2)).astype(np.float32)


def test_rules_assign_first_match_and_float32_elsewhere():
  net = Net(nnx.Rngs(0))
  policy = Policy((Rule(r'^stem$|^head$', None), Rule('scores', NARROW),
                   Rule('.*', lowacc.PAPER_M7E4)))
  assigned = apply_policy(net, policy)
  assert assigned == {'stem': None, 'proj': lowacc.PAPER_M7E4, 'scores': NARROW,
                      'mix': lowacc.PAPER_M7E4, 'head': None}
  assert net.stem.conv_general_dilated is lax.conv_general_dilated
  assert net.proj.dot_general == lowacc.DotGeneral(lowacc.PAPER_M7E4)
  assert Policy.everywhere(NARROW, skip=('^stem$',)).config_for('stem') is None


def test_simulated_layers_compute_what_lowacc_computes(x):
  net = Net(nnx.Rngs(0))
  apply_policy(net, Policy.everywhere(NARROW))
  h = lowacc.conv_general_dilated(x, net.stem.kernel[...], (1, 1), ((1, 1), (1, 1)),
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'), config=NARROW)
  h = (h + net.stem.bias[...]).reshape(2, 25, 4)
  h = (lowacc.dot_general(h, net.proj.kernel[...], (((2,), (0,)), ((), ())), NARROW)
       + net.proj.bias[...])
  s = lowacc.dot_general(h, h, (((2,), (2,)), ((0,), (0,))), NARROW)
  m = jax.nn.relu(lowacc.dot_general(s, net.mix.kernel[...], (((2,), (0,)), ((), ())), NARROW))
  y = (lowacc.dot_general(m, net.head.kernel[...], (((2,), (0,)), ((), ())), NARROW)
       + net.head.bias[...])
  assert_bits_equal(net(x), y, 'policy-applied model')


def test_float32_policy_equals_plain_flax(x):
  plain, net = Net(nnx.Rngs(0)), Net(nnx.Rngs(0))
  apply_policy(net, Policy.everywhere(lowacc.PAPER_M7E4))
  assert not np.array_equal(np.asarray(net(x)), np.asarray(plain(x)))
  apply_policy(net, Policy.everywhere(None))
  assert_bits_equal(net(x), plain(x), 'float32 policy')


def test_two_stage_underflow_switch(x):
  policy = Policy.everywhere(lowacc.PAPER_M7E4_FP8, skip=('head',))
  stage1 = policy.with_underflow('none')
  for rule in stage1.rules:
    if rule.config is not None:
      assert rule.config.acc.underflow == rule.config.product.underflow == 'none'
      assert rule.config.lhs == lowacc.PAPER_M7E4_FP8.lhs  # inputs keep their format
  assert stage1.with_underflow('flush') == policy
  net = Net(nnx.Rngs(0))
  apply_policy(net, stage1)
  y1 = net(x)
  apply_policy(net, policy)
  assert not np.array_equal(np.asarray(y1), np.asarray(net(x)))
  with pytest.raises(ValueError, match="underflow='off' is invalid"):
    policy.with_underflow('off')


def test_layer_counters(x):
  net = Net(nnx.Rngs(0))
  policy = Policy((Rule('^head$', None), Rule('.*', NARROW)))
  stats = layer_stats(net, policy, x)
  # (jnp.einsum, inside nnx.Einsum, scopes its GEMM with the equation)
  assert set(stats) == {'stem', 'proj', 'scores', 'mix/bqk,kh->bqh'}
  # 'scores' is (2, 25, 25) outputs over K = 8: 8 products + 2 chunk combines each.
  assert stats['scores']['steps'] == 2 * 25 * 25 * (8 + 2) and stats['scores']['calls'] == 1
  assert sum(s['sat'] + s['lost'] + s['flush'] for s in stats.values()) > 0
  # A layer's counters are accumulation_stats of its operands, here made by hand-wired layers.
  wired = Net(nnx.Rngs(0))
  apply_policy(wired, policy)
  h = wired.proj(wired.stem(x).reshape(2, 25, 4))
  want = lowacc.accumulation_stats(h, h, (((2,), (2,)), ((0,), (0,))), NARROW)
  assert {k: stats['scores'][k] for k in want} == jax.device_get(want)
  r = rates(stats)
  assert all(0 <= v <= 1 for layer in r.values() for v in layer.values())
  # What apply_policy put into the layers neither changes the counters nor is lost.
  apply_policy(net, Policy.everywhere(lowacc.PAPER_M7E4))
  assert layer_stats(net, policy, x) == stats
  assert net.head.dot_general == lowacc.DotGeneral(lowacc.PAPER_M7E4)


def test_policy_model_trains_under_jit_with_an_estimator(x):
  net = Net(nnx.Rngs(0))
  apply_policy(net, Policy.everywhere(NARROW.replace(ste='recursive_both')))

  @nnx.jit
  def grads(model, v):
    return nnx.grad(lambda m: jnp.sum(m(v) ** 2))(model)

  g = grads(net, x)
  leaves = jax.tree.leaves(g)
  assert leaves and all(np.all(np.isfinite(np.asarray(l))) for l in leaves)


def test_same_callables_work_in_linen(rng):
  x = rng.standard_normal((2, 6, 6, 3)).astype(np.float32)
  conv = linen.Conv(4, (3, 3), padding='SAME', use_bias=False,
                    conv_general_dilated=lowacc.ConvGeneralDilated(NARROW))
  params = conv.init(jax.random.key(0), x)
  k = params['params']['kernel']
  assert_bits_equal(conv.apply(params, x),
                    lowacc.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=(
                        'NHWC', 'HWIO', 'NHWC'), config=NARROW), 'linen Conv')
  dense = linen.Dense(5, use_bias=False, dot_general=lowacc.DotGeneral(NARROW))
  v = x.reshape(2, -1)
  p = dense.init(jax.random.key(1), v)
  assert_bits_equal(dense.apply(p, v), lowacc.matmul(v, p['params']['kernel'], NARROW),
                    'linen Dense')


def test_rule_errors():
  with pytest.raises(ValueError, match='Rule.pattern'):
    Rule('([', None)
  with pytest.raises(ValueError, match='Rule objects'):
    Policy(('.*',))


@pytest.mark.parametrize('equation, sa, sb', [('bqd,bkd->bqk', (2, 3, 4), (2, 5, 4)),
                                              ('bhqk,bkhd->bqhd', (2, 3, 4, 5), (2, 5, 3, 6)),
                                              ('ij,jk->ki', (3, 4), (4, 5)),
                                              ('i,j->ij', (3,), (4,))])
def test_einsum_matches_jnp_einsum(equation, sa, sb, rng):
  a = rng.integers(-4, 5, sa).astype(np.float32)
  b = rng.integers(-4, 5, sb).astype(np.float32)
  assert_bits_equal(lowacc.nn.einsum(equation, a, b), jnp.einsum(equation, a, b), equation)


@pytest.mark.parametrize('equation', ['ij,jk', 'ij,jk->i', 'i...,j->ij', 'ii,ij->ij', 'ij,kl->ik'])
def test_einsum_errors(equation):
  with pytest.raises(ValueError, match='einsum equation'):
    lowacc.nn.einsum(equation, np.ones((3, 3)), np.ones((3, 3)))


def _tiny_bert():
  from lowacc.models import bert
  config = bert.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=32,
                           max_position_embeddings=16)
  model = bert.BertForSequenceClassification(config, 3, rngs=nnx.Rngs(0))
  model.eval()
  return model


def test_policy_on_bert_float32_equals_plain_and_counts_every_gemm(rng):
  ids = rng.integers(0, 50, (2, 8)).astype(np.int32)
  plain, model = _tiny_bert(), _tiny_bert()
  assigned = apply_policy(model, Policy.everywhere(AccumulatorConfig(acc=None)))
  # 2 layers x (q, k, v, attention output, intermediate, output, qk, pv) + pooler + classifier
  assert len(assigned) == 2 * 8 + 2
  assert_bits_equal(model(ids), plain(ids), 'acc=None everywhere')
  apply_policy(model, Policy.everywhere(lowacc.PAPER_M7E4))
  assert not np.array_equal(np.asarray(model(ids)), np.asarray(plain(ids)))
  stats = layer_stats(model, Policy.everywhere(lowacc.PAPER_M7E4), ids)
  assert set(stats) == set(assigned)
  assert all(s['steps'] > 0 for s in stats.values())
  assert stats['bert/encoder/layer/0/attention/self/qk']['steps'] == 2 * 2 * 8 * 8 * (8 + 1)
  assert sum(s['lost'] + s['flush'] for s in stats.values()) > 0


def test_policy_on_resnet_skips_first_and_last(rng):
  from lowacc.models import resnet
  model = resnet.resnet18(num_classes=4, stem='cifar', in_channels=1, width=2, rngs=nnx.Rngs(0))
  model.eval()
  policy = Policy.everywhere(lowacc.PAPER_M7E4, skip=('^conv1$', '^fc$'))
  assigned = apply_policy(model, policy)
  assert assigned['conv1'] is None and assigned['fc'] is None
  assert assigned['layer4/1/conv2'] == lowacc.PAPER_M7E4
  assert assigned['layer2/0/downsample/0'] == lowacc.PAPER_M7E4
  assert len(assigned) == 21  # 20 convs (3 of them downsample) and fc
  stats = layer_stats(model, policy, rng.standard_normal((1, 8, 8, 1)).astype(np.float32))
  assert set(stats) == {name for name, c in assigned.items() if c is not None}
  # layer1's 3x3 convs: 8x8 outputs x 2 channels, K = 9 * 2 = 18 -> 18 products + 2 combines.
  assert stats['layer1/0/conv1']['steps'] == 8 * 8 * 2 * (18 + 2)


def test_einsum_ellipsis_and_linear_general_dot_general_cls(rng):
  a = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
  b = rng.standard_normal((2, 3, 5, 6)).astype(np.float32)
  w = rng.standard_normal((5, 6)).astype(np.float32)
  from lowacc.nn import einsum
  assert_bits_equal(einsum('...mk,...kn->...mn', a, b, precision=lax.Precision.HIGHEST),
                    jnp.einsum('...mk,...kn->...mn', a, b, precision=lax.Precision.HIGHEST))
  assert_bits_equal(einsum('...k,kn->...n', a, w, precision=lax.Precision.HIGHEST),
                    jnp.einsum('...k,kn->...n', a, w, precision=lax.Precision.HIGHEST))
  # Flax prefers dot_general_cls: the policy must replace it, not only dot_general.
  layer = nnx.LinearGeneral(5, 6, dot_general_cls=lambda: lax.dot_general, rngs=nnx.Rngs(0))
  apply_policy(layer, Policy.everywhere(NARROW))
  x = a[0, 0, :2]
  want = lowacc.dot_general(x, layer.kernel[...], (((1,), (0,)), ((), ())), NARROW)
  assert_bits_equal(layer(x), want + layer.bias[...], 'LinearGeneral with dot_general_cls')
