"""A torch-free reader of PyTorch's legacy serialization (`torch.save` before torch 1.6, or with
`_use_new_zipfile_serialization=False`), for the state dicts that published checkpoints hold.

Such a file is four pickles, then the raw storages: the magic number, the protocol version
(1001), a sys_info dict (byte order), the saved object, then the list of storage keys. In the
object a tensor is a call `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`
whose storage is a persistent id `('storage', <torch.FloatStorage etc.>, key, device, numel,
view)`. After the key list, each storage follows in that order: an int64 element count, then
its elements. Unpickling resolves only the globals a state dict uses (OrderedDict, the tensor
rebuilds, the storage types); any other raises ValueError naming it, so no code in the file runs.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
from typing import Any, NamedTuple, Union

import ml_dtypes
import numpy as np

MAGIC = 0x1950a86a20f9469cfc6c
PROTOCOL = 1001

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}


class _StorageType(NamedTuple):
  dtype: type


class _StorageRef(NamedTuple):
  """A (view of a) root storage: elements [offset, offset + numel) of storage `key`."""
  key: str
  offset: int
  numel: int
  dtype: type


class _TensorRef(NamedTuple):
  storage: _StorageRef
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]


def _rebuild_tensor(storage, offset, size, stride, *_):
  """`torch._utils._rebuild_tensor(_v2)`: the tensor is read once the storages are."""
  return _TensorRef(storage, int(offset), tuple(size), tuple(stride))


_GLOBALS = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    **{('torch', name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):

  def __init__(self, file, path):
    super().__init__(file, encoding='latin1')
    self.path = path
    self.roots = {}  # storage key -> (dtype, numel)

  def find_class(self, module, name):
    if (module, name) not in _GLOBALS:
      raise ValueError(f'{self.path}: refers to {module}.{name}, which a state dict of tensors '
                       'does not use; only OrderedDict, tensors and torch storages are read')
    return _GLOBALS[module, name]

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == 'storage'
            and isinstance(pid[1], _StorageType)):
      raise ValueError(f'{self.path}: unknown persistent id {pid!r}')
    _, storage_type, key, _, numel, view = pid
    self.roots.setdefault(key, (storage_type.dtype, int(numel)))
    if view is None:
      return _StorageRef(key, 0, int(numel), storage_type.dtype)
    _, view_offset, view_numel = view
    return _StorageRef(key, int(view_offset), int(view_numel), storage_type.dtype)


def _tensor(ref: _TensorRef, storages: dict[str, np.ndarray]) -> np.ndarray:
  data = storages[ref.storage.key][ref.storage.offset:ref.storage.offset + ref.storage.numel]
  if 0 in ref.shape:
    return np.zeros(ref.shape, data.dtype)
  last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
  if ref.offset < 0 or min(ref.stride, default=0) < 0 or last >= data.size:
    raise ValueError(f'a tensor of shape {ref.shape}, stride {ref.stride} at offset '
                     f'{ref.offset} runs past its storage of {data.size} elements')
  view = np.lib.stride_tricks.as_strided(data[ref.offset:], ref.shape,
                                         [s * data.itemsize for s in ref.stride])
  return np.array(view, order='C')


def _resolve(obj: Any, storages: dict[str, np.ndarray]) -> Any:
  if isinstance(obj, _TensorRef):
    return _tensor(obj, storages)
  if isinstance(obj, dict):
    return {k: _resolve(v, storages) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve(v, storages) for v in obj)
  return obj


def load(path: Union[str, os.PathLike]) -> Any:
  """The object a legacy `torch.save` wrote to `path`, every tensor a numpy array (C-contiguous,
  the storage's dtype; bfloat16 as ml_dtypes.bfloat16) and every OrderedDict a dict in the same
  order. Raises ValueError for a zip-format (torch >= 1.6) file, a wrong magic number or
  protocol, a big-endian file, an unexpected global, or storages that do not match the object's
  references."""
  path = os.fspath(path)
  with open(path, 'rb') as f:
    if f.read(4) == b'PK\x03\x04':
      raise ValueError(f'{path}: is in the zip serialization of torch >= 1.6, not the legacy one '
                       'this reader reads')
    f.seek(0)
    if pickle.load(f) != MAGIC:
      raise ValueError(f'{path}: not a legacy torch.save file (wrong magic number)')
    if (protocol := pickle.load(f)) != PROTOCOL:
      raise ValueError(f'{path}: protocol version {protocol!r}, expected {PROTOCOL}')
    if not pickle.load(f).get('little_endian', True):
      raise ValueError(f'{path}: written on a big-endian machine, which this reader does not read')
    unpickler = _Unpickler(f, path)
    obj = unpickler.load()
    keys = pickle.load(f)
    if sorted(keys) != sorted(unpickler.roots):
      raise ValueError(f'{path}: the storage list {sorted(keys)[:8]} does not match the storages '
                       f'the object refers to {sorted(unpickler.roots)[:8]}')
    storages = {}
    for key in keys:
      dtype, numel = unpickler.roots[key]
      (count,) = struct.unpack('<q', f.read(8))
      if count != numel:
        raise ValueError(f'{path}: storage {key} holds {count} elements, the object says {numel}')
      data = f.read(count * np.dtype(dtype).itemsize)
      if len(data) != count * np.dtype(dtype).itemsize:
        raise ValueError(f'{path}: truncated in storage {key}')
      storages[key] = np.frombuffer(data, dtype)
  return _resolve(obj, storages)
