"""One grain loader for every experiment, and the sources it reads.

A source is anything random-access (`len` and `[i]`) whose elements are dicts: `ArraySource`
over in-memory columns, or a `tfds.data_source` (via `tfds_source`, which checks `data_dir`
first). `make_loader` shards it per JAX process, shuffles, repeats, transforms and batches it as
a `grain.MapDataset`, so batch k is a pure function of (source, seed, shard, k): the same seed
gives the same batches, and a run resumes at a checkpointed step by rebuilding the loader with
`start_step=step` (an O(1) skip, nothing is replayed).
"""

from __future__ import annotations

import importlib.util
import json
import numbers
import pathlib
from typing import Any, Callable, Sequence

import grain
from absl import flags
from etils import epath


class ArraySource:
  """Random access over equal-length columns: element i is `{name: column[i]}`."""

  def __init__(self, **columns: Sequence[Any]):
    lengths = {name: len(column) for name, column in columns.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f'ArraySource needs one or more columns of one length, got {lengths}')
    self.columns = columns
    self._length = next(iter(lengths.values()))

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {name: column[index] for name, column in self.columns.items()}

  def __repr__(self) -> str:
    return f'ArraySource(len={self._length}, columns={list(self.columns)})'


def package_file(package: str, path: str, install: str) -> pathlib.Path:
  """The data file `path` shipped inside the installed `package`, located without importing the
  package. Raises FileNotFoundError that quotes `install` (how to get it) when it is absent."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f'package {package!r} is not installed: {install}')
  file = pathlib.Path(spec.submodule_search_locations[0], path)
  if not file.is_file():
    raise FileNotFoundError(f'{file} is missing from package {package!r}: {install}')
  return file


def tfds_source(name: str, split: str, data_dir: str | None, prepare_hint: str = ''):
  """`tfds.data_source(name, split=split, data_dir=data_dir)`, never downloading.

  Checks first that `data_dir/name/<version>/dataset_info.json` exists and that the data is in a
  random-access format (array_record or parquet); otherwise raises FileNotFoundError or
  ValueError naming the directory, what is expected and how to prepare it (`prepare_hint` is
  appended). Elements are dicts of numpy values (images decoded to uint8, text as bytes).
  """
  if not data_dir:
    raise ValueError(f'{name}: data_dir must name the directory where tfds prepared {name}, '
                     f'got {data_dir!r}')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow; TFDS sets only)
  version = tfds.builder(name, data_dir=data_dir).version
  variant = epath.Path(data_dir) / name / str(version)
  info = variant / 'dataset_info.json'
  if not info.exists():
    raise FileNotFoundError(
        f'{name} is not prepared under data_dir={data_dir!r}: expected {info} and its '
        f'array_record files. Prepare it once with `tfds build {name} --data_dir={data_dir} '
        f'--file_format=array_record`{prepare_hint}.')
  meta = json.loads(info.read_text())
  formats = {meta.get('fileFormat', 'tfrecord'), *meta.get('alternativeFileFormats', [])}
  random_access = {f.value for f in tfds.core.FileFormat.with_random_access()}
  if not formats & random_access:
    raise ValueError(
        f'{name} at {variant} is stored as {sorted(formats)}, but tfds.data_source needs one '
        f'of {sorted(random_access)}: rebuild it with `tfds build {name} --data_dir={data_dir} '
        f'--file_format=array_record`.')
  return tfds.data_source(name, split=split, data_dir=data_dir, download=False)


def make_loader(source, *, batch_size: int,
                transform: Callable[[Any], Any] | grain.transforms.Map
                | grain.transforms.RandomMap | None,
                shuffle: bool, seed: int, num_epochs: int | None = None,
                drop_remainder: bool = True, worker_count: int = 0,
                shard_index: int | None = None, shard_count: int | None = None,
                start_step: int = 0) -> grain.DatasetIterator:
  """An iterator over batches of `source`: dicts of stacked numpy arrays.

  Order of operations: shard, shuffle, repeat, transform, batch, skip `start_step` batches.
  - Shard: this process reads elements shard_index, shard_index + shard_count, ... (strided, so
    a class-sorted source still gives every shard every class). Both None: the JAX process
    (`grain.sharding.ShardByJaxProcess`); both or neither must be given. With drop_remainder
    every shard has len(source) // shard_count elements; without, the first
    len(source) % shard_count shards have one more.
  - Shuffle: a full (not windowed) permutation of the shard from `seed`, new each epoch.
  - Repeat: `num_epochs` passes (None: forever); epochs are concatenated before batching.
  - Transform: a callable or `grain.transforms.Map` on each element, or a
    `grain.transforms.RandomMap` whose generator derives from `seed` and the element's position
    in the repeated stream (so augmentations are reproducible and differ across epochs).
  - Batch: `batch_size` elements; drop_remainder drops a final short batch.
  - Resume: the iterator starts at batch `start_step`, identical to batch `start_step` of an
    uninterrupted loader with the same arguments (batches are random-access, nothing replays).
    This is the supported way to resume; the returned `grain.DatasetIterator` also has
    get_state/set_state, relative to its own start.
  `worker_count` > 0 runs the pipeline in that many processes (`mp_prefetch`; source and
  transform must pickle); the batches are the same.
  """
  for field, value, lowest in (('batch_size', batch_size, 1), ('start_step', start_step, 0),
                               ('worker_count', worker_count, 0)):
    if not isinstance(value, numbers.Integral) or value < lowest:
      raise ValueError(f'{field} must be an int >= {lowest}, got {value!r}')
  if num_epochs is not None and (not isinstance(num_epochs, numbers.Integral) or num_epochs < 1):
    raise ValueError(f'num_epochs must be None (forever) or an int >= 1, got {num_epochs!r}')
  if (shard_index is None) != (shard_count is None):
    raise ValueError(f'give both shard_index and shard_count or neither, got '
                     f'shard_index={shard_index!r}, shard_count={shard_count!r}')
  if shard_index is None:
    shard = grain.sharding.ShardByJaxProcess(drop_remainder=drop_remainder)
  else:
    shard = grain.sharding.ShardOptions(shard_index, shard_count, drop_remainder=drop_remainder)
  n = len(source)
  stop = n - n % shard.shard_count if shard.drop_remainder else n
  ds = grain.MapDataset.source(source)[shard.shard_index:stop:shard.shard_count]
  if not len(ds):
    raise ValueError(f'shard {shard.shard_index} of {shard.shard_count} of a source of {n} '
                     f'elements is empty')
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  if isinstance(transform, grain.transforms.RandomMap):
    ds = ds.random_map(transform, seed=seed)
  elif transform is not None:
    ds = ds.map(transform)
  ds = ds.batch(int(batch_size), drop_remainder=drop_remainder)[int(start_step):]
  loader = ds.to_iter_dataset()
  if worker_count:
    if not flags.FLAGS.is_parsed():  # grain 0.2.18 reads absl flags there: grain#1355
      flags.FLAGS.mark_as_parsed()
    loader = loader.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(worker_count)))
  return iter(loader)
