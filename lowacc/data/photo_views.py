"""Every natural colour photo that installs offline, and deterministic crops and flips of them:
label-free inputs for comparing a simulated model with its float32 self.

The photos (27), all read from installed wheels, none fetched at run time:
- the 20 ImageNet validation photos of foolbox (`imagenet_samples`; labelled);
- scikit-image's colour photographs that its wheel ships (`pip install --no-deps
  scikit-image==0.25.2`): astronaut, coffee, chelsea (a cat), rocket, motorcycle_left and
  motorcycle_right (a stereo pair);
- matplotlib's sample photo grace_hopper.jpg.
Left out: foolbox's CIFAR photos (32 x 32: blown up 7 times they are blur, not photos at the
model's resolution), its MNIST digits, grayscale scans and textures (camera, coins, moon, brick,
grass, ...), and microscopy, retina and telescope images.

A view is a square crop of side `fraction` x the short side (SCALES, the first the Lite eval
crop's 224 / 256) at one of 3 x 3 positions (POSITIONS of the slack along each axis), mirrored
or not: 4 x 9 x 2 = 72 views a photo, 1,944 in all. Views are ordered view-major (view 0 of
every photo, then view 1, ...), so any prefix covers the photos evenly; the first views of a
photo are its centred crops, and at 224 x 224 view 0 is exactly the Lite eval crop
(`imagenet_samples.preprocess`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import grain
import numpy as np
from PIL import Image

from lowacc.data import imagenet_samples
from lowacc.data.pipeline import ArraySource, package_file

SKIMAGE_INSTALL = 'pip install --no-deps scikit-image==0.25.2'
MATPLOTLIB_INSTALL = 'pip install matplotlib'
SKIMAGE_PHOTOS = ('astronaut.png', 'coffee.png', 'chelsea.png', 'rocket.jpg',
                  'motorcycle_left.png', 'motorcycle_right.png')
SCALES = (224 / 256, 0.75, 0.625, 0.5)
POSITIONS = (0.5, 0.0, 1.0)  # the centre first
FLIPS = (False, True)
VIEWS_PER_PHOTO = len(SCALES) * len(POSITIONS) ** 2 * len(FLIPS)
NO_LABEL = -1


def _read(path) -> np.ndarray:
  with Image.open(path) as im:
    return np.asarray(im.convert('RGB'))


@functools.cache
def _photos() -> tuple[tuple[str, ...], tuple[np.ndarray, ...], np.ndarray]:
  labelled = imagenet_samples.imagenet_samples()
  names = [f'imagenet_{i:02d}' for i in range(len(labelled))]
  images = list(labelled.columns['image'])
  labels = list(labelled.columns['label'])
  files = [package_file('skimage', f'data/{name}', SKIMAGE_INSTALL) for name in SKIMAGE_PHOTOS]
  files.append(package_file('matplotlib', 'mpl-data/sample_data/grace_hopper.jpg',
                            MATPLOTLIB_INSTALL))
  for f in files:
    names.append(f.stem)
    images.append(_read(f))
    labels.append(NO_LABEL)
  return tuple(names), tuple(images), np.array(labels, np.int32)


def natural_photos() -> ArraySource:
  """The 27 photos: {'name': str, 'image': uint8 (H, W, 3) RGB, 'label': ImageNet class index,
  or NO_LABEL (-1) for the photos without one}."""
  names, images, labels = _photos()
  return ArraySource(name=list(names), image=list(images), label=labels)


def _boxes(height: int, width: int) -> list[tuple[int, int, int, bool]]:
  """A photo's views as (top, left, side, flip), in view order."""
  short = min(height, width)
  out = []
  for (y, x), fraction, flip in itertools.product(
      itertools.product(POSITIONS, POSITIONS), SCALES, FLIPS):
    side = int(fraction * short)
    out.append((math.ceil(y * (height - side)), math.ceil(x * (width - side)), side, flip))
  return out


def photo_views() -> ArraySource:
  """The 1,944 views, view-major: {'image': the photo (uint8, shared, not copied), 'top',
  'left', 'side', 'flip': the view (ViewTransform crops it), 'view': its index among the
  photo's views, 'photo': the photo's index in natural_photos(), 'label': its label or
  NO_LABEL}."""
  names, images, labels = _photos()
  boxes = [_boxes(*image.shape[:2]) for image in images]
  order = [(v, p) for v in range(VIEWS_PER_PHOTO) for p in range(len(images))]
  top, left, side, flip = zip(*(boxes[p][v] for v, p in order))
  view, photo = (np.array(column, np.int32) for column in zip(*order))
  return ArraySource(image=[images[p] for p in photo], top=np.array(top, np.int32),
                     left=np.array(left, np.int32), side=np.array(side, np.int32),
                     flip=np.array(flip), view=view, photo=photo, label=labels[photo])


@dataclasses.dataclass(frozen=True)
class ViewTransform(grain.transforms.Map):
  """A view of photo_views() as the model takes it: {'image': float32 (size, size, 3) as
  imagenet_samples.square_view makes it, 'label', 'view', 'photo': int32}."""
  size: int = 224

  def map(self, element):
    image = imagenet_samples.square_view(element['image'], int(element['top']),
                                         int(element['left']), int(element['side']), self.size,
                                         bool(element['flip']))
    return {'image': image, **{k: np.int32(element[k]) for k in ('label', 'view', 'photo')}}
