"""ResNet-18/34/50: torchvision's parameter tree, logits equal to an independent PyTorch ResNet,
checkpoint errors, a jitted train step, and the simulated accumulator injected into the layers.

Eager random initialization compiles a sampler per parameter shape (about a second each on the
CPU), so most tests build the model abstractly (`nnx.eval_shape`) and load random weights into it.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
from flax import nnx

import lowacc
from lowacc.models import resnet
from lowacc.models.resnet import load_torchvision, save_torchvision, torchvision_shapes

FACTORIES = {'resnet18': resnet.resnet18, 'resnet34': resnet.resnet34, 'resnet50': resnet.resnet50}

# torchvision's published parameter counts (num_classes=1000).
PARAMS = {'resnet18': 11_689_512, 'resnet34': 21_797_672, 'resnet50': 25_557_032}

# Float32 logits from XLA and from torch differ only in summation order (conv algorithms, blocking,
# the order of the global average pool): each op adds a few float32 ulps of relative error. On the
# CPU the logits differ by about 2e-7 of their scale; 2e-5 leaves room for other kernels and still
# catches real mismatches (BatchNorm epsilon 1e-3 instead of 1e-5 alone moves them by 4e-4).
RTOL = ATOL = 2e-5


def _abstract(name, **kwargs):
  return nnx.eval_shape(lambda: FACTORIES[name](rngs=nnx.Rngs(0), **kwargs))


def _shapes(name, **kwargs):
  return torchvision_shapes(_abstract(name, **kwargs))


def _random_state_dict(shapes, seed):
  """Torch-layout random weights (He-scaled) and non-trivial BatchNorm affine and running stats."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in shapes.items():
    if len(shape) > 1:  # conv or fc weight, (out, in, ...)
      value = rng.standard_normal(shape) * math.sqrt(2 / math.prod(shape[1:]))
    elif key.endswith('running_var'):
      value = rng.uniform(0.5, 2.0, shape)
    elif key.endswith('weight'):
      value = rng.uniform(0.5, 1.5, shape)
    else:  # BatchNorm bias and running_mean, fc bias
      value = rng.normal(0, 0.2, shape)
    out[key] = value.astype(np.float32)
  return out


def _random_model(name, seed=0, **kwargs):
  model = _abstract(name, **kwargs)
  load_torchvision(model, _random_state_dict(torchvision_shapes(model), seed))
  return model


def _forward(model, x):
  return nnx.jit(lambda m, x: m(x))(model, x)


# ---- the parameter tree -------------------------------------------------------------------------


@pytest.mark.parametrize('name', sorted(PARAMS))
def test_parameter_count_is_torchvisions(name):
  model = _abstract(name)
  count = sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert count == PARAMS[name]


@pytest.mark.parametrize('name,convs', [('resnet18', 20), ('resnet34', 36), ('resnet50', 53)])
def test_state_dict_keys_and_shapes(name, convs):
  shapes = _shapes(name)
  # Each conv has a weight and a BatchNorm with 4 entries; fc has weight and bias.
  assert len(shapes) == 5 * convs + 2
  assert shapes['conv1.weight'] == (64, 3, 7, 7)
  assert shapes['bn1.running_var'] == (64,)
  assert shapes['fc.bias'] == (1000,)
  if name == 'resnet50':
    assert shapes['layer1.0.conv3.weight'] == (256, 64, 1, 1)
    assert shapes['layer1.0.downsample.0.weight'] == (256, 64, 1, 1)
    assert shapes['layer2.0.conv2.weight'] == (128, 128, 3, 3)  # v1.5: the stride is here
    assert shapes['layer4.2.bn3.weight'] == (2048,)
    assert shapes['fc.weight'] == (1000, 2048)
  else:
    assert not any('conv3' in k for k in shapes)
    assert 'layer1.0.downsample.0.weight' not in shapes
    assert shapes['layer2.0.downsample.0.weight'] == (128, 64, 1, 1)
    assert shapes['layer2.0.downsample.1.running_mean'] == (128,)
    assert shapes['layer4.1.conv2.weight'] == (512, 512, 3, 3)
    assert shapes['fc.weight'] == (1000, 512)


def test_stem_width_and_channels():
  shapes = _shapes('resnet18', stem='cifar', width=8, in_channels=1, num_classes=10)
  assert shapes['conv1.weight'] == (8, 1, 3, 3)
  assert shapes['layer4.1.conv2.weight'] == (64, 64, 3, 3)
  assert shapes['fc.weight'] == (10, 64)


@pytest.mark.parametrize('stem,size', [('imagenet', 64), ('cifar', 28)])
def test_output_shape(stem, size):
  out = jax.eval_shape(
      lambda x: resnet.resnet18(num_classes=10, stem=stem, in_channels=1, width=4,
                                rngs=nnx.Rngs(0))(x),
      jax.ShapeDtypeStruct((2, size, size, 1), jnp.float32))
  assert out.shape == (2, 10) and out.dtype == jnp.float32


@pytest.mark.parametrize('field,value,valid', [
    ('stem', 'mnist', "valid values are ('imagenet', 'cifar')"),
    ('width', 0, 'must be an int >= 1'),
    ('num_classes', 2.0, 'must be an int >= 1'),
])
def test_bad_arguments_raise(field, value, valid):
  with pytest.raises(ValueError, match=rf'{field}=.*{re.escape(valid)}'):
    resnet.resnet18(rngs=nnx.Rngs(0), **{field: value})


def test_init_follows_torchvision():
  # An 'rbg' key: its sampler compiles several times faster than threefry's on the CPU.
  model = resnet.resnet18(num_classes=10, stem='cifar', width=2,
                          rngs=nnx.Rngs(jax.random.key(0, impl='rbg')))
  kernel = np.asarray(model.layer4[1].conv2.kernel[...])  # (3, 3, 16, 16)
  np.testing.assert_allclose(kernel.std(), math.sqrt(2 / (9 * 16)), rtol=0.1)  # kaiming, fan_out
  bound = 16 ** -0.5  # nn.Linear's U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  for value in (model.fc.kernel[...], model.fc.bias[...]):
    assert np.abs(value).max() <= bound and np.abs(value).max() > bound / 2
  bn = model.layer2[0].downsample[1]
  assert (bn.momentum, bn.epsilon) == (0.9, 1e-5)
  for value, expected in ((bn.scale, 1), (bn.bias, 0), (bn.mean, 0), (bn.var, 1)):
    np.testing.assert_array_equal(value[...], expected)


# ---- an independent PyTorch ResNet (torchvision's layout and names) ----------------------------


def _torch_resnet(bottleneck, layers, num_classes, stem, width):
  """A plain-PyTorch ResNet written after torchvision's architecture, independent of lowacc."""
  torch = pytest.importorskip('torch')
  nn = torch.nn

  class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride, downsample):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.relu = nn.ReLU()
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.downsample = downsample

    def forward(self, x):
      identity = x if self.downsample is None else self.downsample(x)
      out = self.relu(self.bn1(self.conv1(x)))
      return self.relu(self.bn2(self.conv2(out)) + identity)

  class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride, downsample):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(planes * 4)
      self.relu = nn.ReLU()
      self.downsample = downsample

    def forward(self, x):
      identity = x if self.downsample is None else self.downsample(x)
      out = self.relu(self.bn1(self.conv1(x)))
      out = self.relu(self.bn2(self.conv2(out)))
      return self.relu(self.bn3(self.conv3(out)) + identity)

  block = Bottleneck if bottleneck else BasicBlock

  class ResNet(nn.Module):

    def __init__(self):
      super().__init__()
      if stem == 'imagenet':
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
      else:
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.maxpool = nn.Identity()
      self.bn1 = nn.BatchNorm2d(width)
      self.relu = nn.ReLU()
      self.inplanes = width
      for i, n in enumerate(layers):
        setattr(self, f'layer{i + 1}', self._make_layer(width * 2 ** i, n, 1 if i == 0 else 2))
      self.avgpool = nn.AdaptiveAvgPool2d(1)
      self.fc = nn.Linear(self.inplanes, num_classes)

    def _make_layer(self, planes, blocks, stride):
      downsample = None
      if stride != 1 or self.inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
            nn.BatchNorm2d(planes * block.expansion))
      out = [block(self.inplanes, planes, stride, downsample)]
      self.inplanes = planes * block.expansion
      out += [block(self.inplanes, planes, 1, None) for _ in range(1, blocks)]
      return nn.Sequential(*out)

    def forward(self, x):
      x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
      x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
      return self.fc(torch.flatten(self.avgpool(x), 1))

  return ResNet()


ARCHS = {'resnet18': (False, (2, 2, 2, 2)), 'resnet34': (False, (3, 4, 6, 3)),
         'resnet50': (True, (3, 4, 6, 3))}


def _random_torch_model(name, seed, stem='imagenet', width=8):
  """The torch reference (10 classes) with random weights and non-trivial BatchNorm affine and
  running stats, in eval mode."""
  torch = pytest.importorskip('torch')
  torch.manual_seed(seed)
  from tests.reference.torch_batch_norm import randomize_batch_norm
  return randomize_batch_norm(_torch_resnet(*ARCHS[name], 10, stem, width)).eval()


@pytest.mark.parametrize('name', sorted(ARCHS))
def test_keys_and_shapes_match_the_torch_reference(name):
  torch = pytest.importorskip('torch')
  with torch.device('meta'):
    reference = _torch_resnet(*ARCHS[name], 1000, 'imagenet', 64)
  expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()
              if not k.endswith('num_batches_tracked')}
  assert _shapes(name) == expected
  assert sum(p.numel() for p in reference.parameters()) == PARAMS[name]


def _compare(torch_model, model, x):
  torch = pytest.importorskip('torch')
  with torch.no_grad():
    expected = torch_model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  actual = np.asarray(_forward(model, jnp.asarray(x)))
  assert np.abs(expected).max() > 0.1  # a meaningful comparison: the logits are not all ~0
  np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL * np.abs(expected).max())


@pytest.mark.parametrize('name,stem,size', [('resnet18', 'imagenet', 64), ('resnet18', 'cifar', 16),
                                            ('resnet50', 'imagenet', 64)])
def test_logits_equal_torch_reference(name, stem, size, tmp_path):
  safetensors_torch = pytest.importorskip('safetensors.torch')
  torch_model = _random_torch_model(name, seed=0, stem=stem)
  path = tmp_path / f'{name}.safetensors'
  safetensors_torch.save_file(torch_model.state_dict(), str(path))
  model = _abstract(name, num_classes=10, stem=stem, width=8)
  load_torchvision(model, path)
  model.eval()
  x = np.random.default_rng(0).standard_normal((2, size, size, 3), np.float32)
  _compare(torch_model, model, x)


def test_train_mode_matches_torch_and_updates_running_mean():
  """Training-mode BatchNorm normalizes with the batch's statistics in both, and torch's momentum
  0.1 is flax's 0.9: the running means agree after a step. (The running variances differ by
  design: torch updates them with the unbiased batch variance.)"""
  pytest.importorskip('torch')
  torch_model = _random_torch_model('resnet18', seed=1, stem='cifar')
  model = _abstract('resnet18', num_classes=10, stem='cifar', width=8)
  load_torchvision(model, {k: v.numpy() for k, v in torch_model.state_dict().items()})
  x = np.random.default_rng(1).standard_normal((4, 16, 16, 3), np.float32)
  torch_model.train()
  _compare(torch_model, model, x)  # a new lowacc model is in training mode, as in torch
  pairs = ((model.bn1, torch_model.bn1), (model.layer3[0].bn2, torch_model.layer3[0].bn2))
  for ours, theirs in pairs:
    np.testing.assert_allclose(np.asarray(ours.mean[...]), theirs.running_mean.numpy(),
                               rtol=1e-4, atol=1e-5)


def test_save_torchvision_round_trips_through_torch(tmp_path):
  pytest.importorskip('torch')
  safetensors_torch = pytest.importorskip('safetensors.torch')
  model = _random_model('resnet50', seed=3, num_classes=10, width=8)
  path = tmp_path / 'saved.safetensors'
  save_torchvision(model, path)
  torch_model = _torch_resnet(True, (3, 4, 6, 3), 10, 'imagenet', 8)
  torch_model.load_state_dict(safetensors_torch.load_file(str(path)), strict=True)
  torch_model.eval()
  model.eval()
  x = np.random.default_rng(2).standard_normal((2, 32, 32, 3), np.float32)
  _compare(torch_model, model, x)


def test_save_load_round_trip_is_exact(tmp_path):
  state = _random_state_dict(_shapes('resnet18', num_classes=10, width=4), seed=0)
  model = _abstract('resnet18', num_classes=10, width=4)
  load_torchvision(model, state)
  path = tmp_path / 'r18.safetensors'
  save_torchvision(model, path)
  saved = safetensors.numpy.load_file(str(path))
  assert saved.keys() == state.keys()
  for key, value in state.items():
    np.testing.assert_array_equal(saved[key], value, err_msg=key)


def test_load_copies_the_arrays():
  state = _random_state_dict(_shapes('resnet18', num_classes=10, width=4), seed=0)
  model = _abstract('resnet18', num_classes=10, width=4)
  load_torchvision(model, state)
  state['bn1.running_mean'][:] = 7  # the caller reuses its buffers, as torch does in training
  assert not np.any(np.asarray(model.bn1.mean[...]) == 7)


# ---- checkpoint errors --------------------------------------------------------------------------


def _zeros_state_dict(name, **kwargs):
  """A torch-layout state dict: only the keys and shapes matter."""
  shapes = _shapes(name, num_classes=10, width=8, **kwargs)
  out = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
  out['bn1.num_batches_tracked'] = np.zeros((), np.int64)  # ignored, as in torchvision's files
  return out


def test_loading_resnet50_into_resnet18_names_both():
  with pytest.raises(ValueError) as info:
    load_torchvision(_abstract('resnet18', num_classes=10, width=8), _zeros_state_dict('resnet50'))
  message = str(info.value)
  assert 'the checkpoint is for resnet50(' in message
  assert 'has layer1.0.conv3.weight' in message
  assert 'but the model is resnet18(' in message
  assert ("build the model as resnet50(num_classes=10, stem='imagenet', in_channels=3, width=8)"
          in message)
  assert 'checkpoint keys the model does not have' in message


def test_wrong_arguments_are_suggested():
  with pytest.raises(ValueError, match=r"build the model as resnet18\(num_classes=10, "
                     r"stem='cifar', in_channels=1, width=8\)"):
    load_torchvision(_abstract('resnet18', num_classes=1000, width=8),
                     _zeros_state_dict('resnet18', stem='cifar', in_channels=1))


def test_wrong_shape_names_key_and_shapes():
  state = _zeros_state_dict('resnet18')
  state['layer2.1.conv1.weight'] = np.zeros((16, 8, 3, 3), np.float32)
  with pytest.raises(ValueError) as info:
    load_torchvision(_abstract('resnet18', num_classes=10, width=8), state)
  message = str(info.value)
  assert 'shapes that differ (torch layout) (1)' in message
  assert 'layer2.1.conv1.weight: checkpoint (16, 8, 3, 3), model (16, 16, 3, 3)' in message
  assert 'incomplete, altered or not a torchvision ResNet state dict' in message


def test_missing_key_is_named():
  state = _zeros_state_dict('resnet18')
  del state['layer3.0.downsample.1.running_var']
  with pytest.raises(ValueError) as info:
    load_torchvision(_abstract('resnet18', num_classes=10, width=8), state)
  message = str(info.value)
  assert 'model parameters missing from the checkpoint (1)' in message
  assert 'layer3.0.downsample.1.running_var' in message


def test_failed_load_leaves_the_model_unchanged():
  model = _random_model('resnet18', num_classes=10, width=8)
  before = jax.tree.map(np.asarray, nnx.state(model))
  state = _zeros_state_dict('resnet18')
  del state['fc.bias']
  with pytest.raises(ValueError):
    load_torchvision(model, state)
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, nnx.state(model)))


# ---- training -----------------------------------------------------------------------------------


@nnx.jit
def _train_step(model, optimizer, x, y):
  def loss_fn(model):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


@pytest.mark.parametrize('name', ['resnet18', 'resnet50'])
def test_jitted_train_step_updates_params_and_batch_stats(name):
  model = _random_model(name, num_classes=10, stem='cifar', width=8)
  optimizer = nnx.Optimizer(model, optax.sgd(0.01, momentum=0.9), wrt=nnx.Param)
  params = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  stats = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 32, 32, 3), np.float32))
  y = jnp.asarray([3, 7])
  losses = [float(_train_step(model, optimizer, x, y)) for _ in range(2)]
  assert np.all(np.isfinite(losses))
  assert int(optimizer.step[...]) == 2
  new_params = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), params, new_params)
  assert all(jax.tree.leaves(changed)), 'every parameter takes a gradient step'
  new_stats = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), stats, new_stats)
  assert all(jax.tree.leaves(changed)), 'every running mean and variance is updated'


# ---- the simulated accumulator, injected by hand ------------------------------------------------


def test_simulated_accumulator_in_every_layer():
  kwargs = dict(num_classes=5, stem='cifar', width=2)
  plain = _random_model('resnet18', **kwargs)
  plain.eval()
  state = nnx.state(plain)

  def injected(config):
    model = _abstract('resnet18', conv_general_dilated=lowacc.ConvGeneralDilated(config),
                      dot_general=lowacc.DotGeneral(config), **kwargs)
    nnx.update(model, state)
    model.eval()
    return model

  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 8, 8, 3), np.float32))
  expected = np.asarray(_forward(plain, x))
  np.testing.assert_array_equal(np.asarray(_forward(injected(None), x)), expected)
  simulated = injected(lowacc.PAPER_M7E4)
  assert isinstance(simulated.layer3[0].downsample[0].conv_general_dilated,
                    lowacc.ConvGeneralDilated)
  out = np.asarray(_forward(simulated, x))
  assert np.all(np.isfinite(out)) and not np.array_equal(out, expected)
  # M7E4 keeps 8 significant bits: the logits move by a few of its ulps, not arbitrarily.
  np.testing.assert_allclose(out, expected, rtol=0.1, atol=0.1 * np.abs(expected).max())
