"""ResNet-18/34/50 in Flax NNX with torchvision's architecture and parameter names.

The layers are stock `nnx.Conv`, `nnx.BatchNorm` and `nnx.Linear`; a policy puts a simulated
accumulator into them later through their `conv_general_dilated` and `dot_general` attributes.
Inputs are NHWC float32 images, kernels HWIO.

torchvision's ResNet is followed exactly (v1.5: a Bottleneck's stride is on its 3x3 conv), so a
torchvision or timm state dict maps onto the model key for key: the module path
`layer1[0].downsample[0].kernel` is `layer1.0.downsample.0.weight`. `load_torchvision` and
`save_torchvision` convert between the two (OIHW <-> HWIO, (out, in) <-> (in, out); BatchNorm
weight, bias, running_mean, running_var <-> scale, bias, mean, var).

BatchNorm uses torch's conventions: epsilon 1e-5 and momentum 0.1 (flax's 0.9). One difference
remains in training mode: flax updates the running variance with the biased batch variance, torch
with the unbiased one (a factor n / (n - 1), n the number of values per channel).
"""

from __future__ import annotations

import os
import re
from typing import Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx
from jax import lax

from lowacc.models import torch_state
from lowacc.models.mismatch import mismatch_detail

STEMS = ('imagenet', 'cifar')

# torchvision's inits: kaiming_normal_(mode='fan_out', nonlinearity='relu') for convs; nn.Linear's
# default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for fc's weight and bias.
_CONV_INIT = nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal')
_FC_INIT = nnx.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def _conv(cin: int, cout: int, size: int, stride: int, layer_kw, rngs: nnx.Rngs) -> nnx.Conv:
  """torchvision's bias-free conv: padding size // 2 on every side, given explicitly."""
  pad = size // 2
  return nnx.Conv(cin, cout, (size, size), (stride, stride), padding=((pad, pad), (pad, pad)),
                  use_bias=False, kernel_init=_CONV_INIT, rngs=rngs, **layer_kw)


def _bn(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
  return torch_state.batch_norm(features, rngs)


def _downsample(cin: int, cout: int, stride: int, layer_kw, rngs: nnx.Rngs):
  """torchvision's shortcut projection `downsample = Sequential(conv1x1, BatchNorm)`, or None
  where the identity fits."""
  if stride == 1 and cin == cout:
    return None
  return nnx.List([_conv(cin, cout, 1, stride, layer_kw, rngs), _bn(cout, rngs)])


def _shortcut(downsample, x):
  return x if downsample is None else downsample[1](downsample[0](x))


class BasicBlock(nnx.Module):
  """Two 3x3 convs (the first strided) with BatchNorm, plus the shortcut: ResNet-18/34's block."""
  expansion = 1

  def __init__(self, cin: int, planes: int, stride: int, layer_kw, *, rngs: nnx.Rngs):
    self.conv1 = _conv(cin, planes, 3, stride, layer_kw, rngs)
    self.bn1 = _bn(planes, rngs)
    self.conv2 = _conv(planes, planes, 3, 1, layer_kw, rngs)
    self.bn2 = _bn(planes, rngs)
    self.downsample = _downsample(cin, planes, stride, layer_kw, rngs)

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return nnx.relu(y + _shortcut(self.downsample, x))


class Bottleneck(nnx.Module):
  """1x1 reduce, 3x3 (strided: torchvision's v1.5), 1x1 expand by 4, plus the shortcut:
  ResNet-50's block."""
  expansion = 4

  def __init__(self, cin: int, planes: int, stride: int, layer_kw, *, rngs: nnx.Rngs):
    cout = planes * self.expansion
    self.conv1 = _conv(cin, planes, 1, 1, layer_kw, rngs)
    self.bn1 = _bn(planes, rngs)
    self.conv2 = _conv(planes, planes, 3, stride, layer_kw, rngs)
    self.bn2 = _bn(planes, rngs)
    self.conv3 = _conv(planes, cout, 1, 1, layer_kw, rngs)
    self.bn3 = _bn(cout, rngs)
    self.downsample = _downsample(cin, cout, stride, layer_kw, rngs)

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = nnx.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return nnx.relu(y + _shortcut(self.downsample, x))


def _check_positive(field: str, value):
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f'ResNet: {field}={value!r} is invalid: must be an int >= 1')


class ResNet(nnx.Module):
  """torchvision's ResNet on NHWC float32 inputs; `model(x)` returns (N, num_classes) logits.

  block: `BasicBlock` or `Bottleneck`. layers: the number of blocks in layer1..layer4.
  stem: 'imagenet' is torchvision's 7x7 stride-2 conv1 and 3x3 stride-2 max pool; 'cifar' is a 3x3
    stride-1 conv1 without max pool, the usual variant for 32x32 (and MNIST's 28x28) inputs.
  width: the channels of conv1 and layer1 (torchvision: 64); layer i has width * 2**(i-1) planes.
  conv_general_dilated: every Conv's convolution; dot_general: fc's product. precision: both's;
    HIGHEST by default, so that float32 means float32 on GPUs and TPUs too.

  BatchNorm normalizes with batch statistics (and updates the running ones) until `model.eval()`;
  `model.train()` switches back. A new model is in training mode, as in torch.
  """

  def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int], *,
               num_classes: int = 1000, stem: str = 'imagenet', in_channels: int = 3,
               width: int = 64, conv_general_dilated=lax.conv_general_dilated,
               dot_general=lax.dot_general, precision=lax.Precision.HIGHEST, rngs: nnx.Rngs):
    if block not in (BasicBlock, Bottleneck):
      raise ValueError(f'ResNet: block={block!r} is invalid: must be BasicBlock or Bottleneck')
    if len(layers) != 4:
      raise ValueError(f'ResNet: layers={layers!r} is invalid: must give 4 block counts')
    for i, n in enumerate(layers):
      _check_positive(f'layers[{i}]', n)
    if stem not in STEMS:
      raise ValueError(f'ResNet: stem={stem!r} is invalid: valid values are {STEMS}')
    for field, value in (('num_classes', num_classes), ('in_channels', in_channels),
                         ('width', width)):
      _check_positive(field, value)
    layer_kw = dict(conv_general_dilated=conv_general_dilated, precision=precision)
    self.stem = stem
    self.conv1 = (_conv(in_channels, width, 7, 2, layer_kw, rngs) if stem == 'imagenet'
                  else _conv(in_channels, width, 3, 1, layer_kw, rngs))
    self.bn1 = _bn(width, rngs)
    cin = width
    for i, n in enumerate(layers):
      planes = width * 2 ** i
      blocks = []
      for j in range(n):
        blocks.append(block(cin, planes, 2 if i > 0 and j == 0 else 1, layer_kw, rngs=rngs))
        cin = planes * block.expansion
      setattr(self, f'layer{i + 1}', nnx.List(blocks))
    bound = cin ** -0.5
    self.fc = nnx.Linear(
        cin, num_classes, kernel_init=_FC_INIT,
        bias_init=lambda key, shape, dtype=jnp.float32: jax.random.uniform(
            key, shape, dtype, -bound, bound),
        dot_general=dot_general, precision=precision, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    if self.stem == 'imagenet':
      x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
      for block in layer:
        x = block(x)
    return self.fc(x.mean(axis=(1, 2)))


def resnet18(**kwargs) -> ResNet:
  """ResNet-18: BasicBlocks [2, 2, 2, 2]; 11,689,512 parameters at the defaults."""
  return ResNet(BasicBlock, (2, 2, 2, 2), **kwargs)


def resnet34(**kwargs) -> ResNet:
  """ResNet-34: BasicBlocks [3, 4, 6, 3]; 21,797,672 parameters at the defaults."""
  return ResNet(BasicBlock, (3, 4, 6, 3), **kwargs)


def resnet50(**kwargs) -> ResNet:
  """ResNet-50: Bottlenecks [3, 4, 6, 3]; 25,557,032 parameters at the defaults."""
  return ResNet(Bottleneck, (3, 4, 6, 3), **kwargs)


_ARCHITECTURES = {'resnet18': (BasicBlock, (2, 2, 2, 2)), 'resnet34': (BasicBlock, (3, 4, 6, 3)),
                  'resnet50': (Bottleneck, (3, 4, 6, 3))}

def torchvision_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
  """The torchvision state-dict keys the model maps to, with their shapes in torch's layout
  (`num_batches_tracked` excluded). Works on `nnx.eval_shape` models."""
  return torch_state.shapes(torch_state.entries(model))


def _architecture(shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, str]:
  """(factory call that builds a model with these shapes, evidence for its block type)."""
  conv3 = sorted(k for k in shapes if re.fullmatch(r'layer\d+\.\d+\.conv3\.weight', k))
  block = Bottleneck if conv3 else BasicBlock
  evidence = f'has {conv3[0]}' if conv3 else 'its blocks have no conv3'
  layers = tuple(1 + max((int(m.group(1)) for k in shapes
                          if (m := re.match(rf'layer{i}\.(\d+)\.', k))), default=-1)
                 for i in range(1, 5))
  name = next((n for n, arch in _ARCHITECTURES.items() if arch == (block, layers)), None)
  args = []
  if len(fc := shapes.get('fc.weight', ())) == 2:
    args.append(f'num_classes={fc[0]}')
  if len(conv1 := shapes.get('conv1.weight', ())) == 4:
    args += [f"stem='{'imagenet' if conv1[2] == 7 else 'cifar'}'", f'in_channels={conv1[1]}',
             f'width={conv1[0]}']
  if name is None:
    return f'ResNet({block.__name__}, {list(layers)}, {", ".join(args)})', evidence
  return f'{name}({", ".join(args)})', evidence


def _mismatch_error(expected, found) -> ValueError:
  """Names what differs between the model's and the checkpoint's keys and shapes, and the fix."""
  missing = [k for k in expected if k not in found]
  unused = [k for k in found if k not in expected]
  wrong = [f'{k}: checkpoint {found[k]}, model {expected[k]}' for k in expected
           if k in found and expected[k] != found[k]]
  ckpt_arch, ckpt_evidence = _architecture(found)
  model_arch, model_evidence = _architecture(expected)
  if ckpt_arch != model_arch:
    if ckpt_evidence != model_evidence:
      ckpt_text, model_text = f'{ckpt_arch} ({ckpt_evidence})', f'{model_arch} ({model_evidence})'
    else:
      ckpt_text, model_text = ckpt_arch, model_arch
    head = (f'the checkpoint is for {ckpt_text} but the model is {model_text}; '
            f'build the model as {ckpt_arch}')
  else:
    head = ('the checkpoint does not match the model it appears to be for, '
            f'{model_arch}: it is incomplete, altered or not a torchvision ResNet state dict')
  detail = mismatch_detail(wrong, missing, unused, 'torch')
  return ValueError(f'load_torchvision: {head}.{detail}')


def load_torchvision(model: nnx.Module,
                     checkpoint: Union[str, os.PathLike, Mapping[str, np.ndarray]]) -> None:
  """Assigns a torchvision/timm ResNet state dict to `model`'s parameters and batch statistics.

  checkpoint: a safetensors file of the state dict, or the state dict itself (arrays in torch's
  layout; `num_batches_tracked` is ignored). Every model variable must be assigned and every
  checkpoint key used, with matching shapes; otherwise raises ValueError naming the keys, the
  shapes and the model to build. Values are copied and cast to the variables' dtypes. The model
  may be abstract (`nnx.eval_shape(lambda: resnet50(rngs=nnx.Rngs(0)))`), which skips the random
  initialization.
  """
  if isinstance(checkpoint, (str, os.PathLike)):
    checkpoint = safetensors.numpy.load_file(os.fspath(checkpoint))
  tensors = {k: np.asarray(v) for k, v in checkpoint.items()
             if not k.endswith('num_batches_tracked')}
  entries = torch_state.entries(model)
  expected = torch_state.shapes(entries)
  found = {k: tuple(t.shape) for k, t in tensors.items()}
  if expected != found:
    raise _mismatch_error(expected, found)
  torch_state.assign(entries, tensors)


def save_torchvision(model: nnx.Module, path: Union[str, os.PathLike]) -> None:
  """Writes the model's parameters and batch statistics as a torchvision state dict (torch's
  layout) to a safetensors file, the inverse of `load_torchvision`. torch's `load_state_dict`
  accepts it as is: it fills in the missing `num_batches_tracked`."""
  tensors = {key: np.ascontiguousarray(torch_state.to_torch_layout(np.asarray(var[...])))
             for key, var in torch_state.entries(model).items()}
  safetensors.numpy.save_file(tensors, os.fspath(path))
