"""Tasks by name (config.task): the model, data, loss and metric of an experiment.

A task knows how to build its model, load pretrained weights, feed batches and score them; the
recipe in train.py is the same for all. Batches are dicts of numpy arrays; every evaluation batch
carries 'valid' (1 for real examples, 0 for the padding that fills the last batch).
"""

from __future__ import annotations

import functools
import os

import jax.numpy as jnp
import numpy as np
import optax

from lowacc.data import imagenet_samples, images, photo_views, pipeline, text
from lowacc.models import bert, efficientnet, resnet

# Layer-name patterns of attention's two activation products (lowacc/models/bert.py).
ATTENTION_PATTERNS = ('/qk$', '/pv$')


def _subset(source, limit: int):
  return source if not limit or limit >= len(source) else [source[i] for i in range(limit)]


def _padded(batches, batch_size: int):
  """Pads the last batch to batch_size and marks real examples in 'valid'."""
  for batch in batches:
    n = len(next(iter(batch.values())))
    pad = batch_size - n
    out = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) if pad else v
           for k, v in batch.items()}
    out['valid'] = (np.arange(batch_size) < n).astype(np.float32)
    yield out


class _Task:
  """What every task shares: sources, loaders and the accuracy summary."""

  def __init__(self, config):
    self.config = config

  def sources(self, config):
    raise NotImplementedError

  def train_size(self, config) -> int:
    return len(self._train(config))

  def _train(self, config):
    return _subset(self.sources(config)[0], config.data.max_train_examples)

  def train_batches(self, config, seed: int, start_step: int):
    """Endless shuffled training batches, from batch `start_step` on (deterministic)."""
    return pipeline.make_loader(self._train(config), batch_size=config.data.batch_size,
                                transform=self.transform(train=True), shuffle=True, seed=seed,
                                start_step=start_step)

  def eval_size(self, config) -> int:
    """The number of examples eval_batches yields."""
    n, limit = len(self.sources(config)[1]), config.data.max_eval_examples
    return min(n, limit) if limit else n

  def eval_batches(self, config):
    source = _subset(self.sources(config)[1], config.data.max_eval_examples)
    batches = pipeline.make_loader(source, batch_size=config.data.eval_batch_size,
                                   transform=self.transform(train=False), shuffle=False, seed=0,
                                   num_epochs=1, drop_remainder=False)
    return _padded(batches, config.data.eval_batch_size)

  def summarize(self, totals) -> float:
    return totals['correct'] / max(totals['count'], 1)


class ImageClassification(_Task):
  """ResNet-18/34/50 on MNIST, Fashion-MNIST or ImageNet, EfficientNet-Lite0/1/2 on ImageNet, on
  its 20 offline photos ('imagenet_samples', evaluation only: training reads the same photos) or
  on the label-free views of every offline photo ('photo_views', labels -1 where a photo has
  none: for experiments.agreement); cross-entropy, top-1 accuracy."""

  MODELS = {'resnet18': resnet.resnet18, 'resnet34': resnet.resnet34, 'resnet50': resnet.resnet50,
            **{f'efficientnet_{v}': functools.partial(efficientnet.efficientnet_lite, v)
               for v in efficientnet.VARIANTS}}

  def check(self, config):
    if config.model.name not in self.MODELS:
      raise ValueError(f'config.model.name={config.model.name!r} is invalid for '
                       f'image_classification: valid values are {tuple(self.MODELS)}')
    if config.data.name == 'photo_views' and not config.model.name.startswith('efficientnet_'):
      raise ValueError(f"config.data.name='photo_views' is invalid for config.model.name="
                       f"{config.model.name!r}: its views are normalized for EfficientNet-Lite "
                       "(efficientnet_lite0, _lite1, _lite2)")
    if config.pretrained and not os.path.isfile(config.pretrained):
      raise FileNotFoundError(f'config.pretrained={config.pretrained!r} does not exist: give a '
                              'torchvision ResNet state dict saved as .safetensors (EfficientNet: '
                              'a legacy .pth, efficientnet.checkpoint(name))')
    if not config.pretrained and not config.init_from and config.pretrain.steps == 0:
      raise ValueError('config.pretrained is empty and config.pretrain.steps=0: give pretrained '
                       'weights (a torchvision state dict as .safetensors) or config.init_from, or '
                       'train from scratch in float32 with config.pretrain.steps=-1 (epochs) or > 0')
    self.sources(config)

  def sources(self, config):
    name = config.data.name
    if name in ('mnist', 'fashion_mnist'):
      load = images.mnist if name == 'mnist' else images.fashion_mnist
      return load('train'), load('test')
    if name == 'imagenet':
      return (images.imagenet(config.data.data_dir, 'train'),
              images.imagenet(config.data.data_dir, 'validation'))
    if name == 'imagenet_samples':
      photos = imagenet_samples.imagenet_samples()
      return photos, photos
    if name == 'photo_views':
      views = photo_views.photo_views()
      return views, views
    raise ValueError(f"config.data.name={name!r} is invalid for image_classification: valid "
                     "values are 'mnist', 'fashion_mnist', 'imagenet', 'imagenet_samples', "
                     "'photo_views'")

  def transform(self, train: bool):
    if self.config.model.name.startswith('efficientnet_'):  # its eval preprocessing, always
      variant = efficientnet.VARIANTS[self.config.model.name.removeprefix('efficientnet_')]
      if self.config.data.name == 'photo_views':
        return photo_views.ViewTransform(variant.image_size)
      return imagenet_samples.LiteEvalTransform(variant.image_size)
    if self.config.data.name in ('imagenet', 'imagenet_samples'):
      return images.imagenet_transform(train)
    return images.small_transform

  def create_model(self, rngs):
    m = self.config.model
    if m.name.startswith('efficientnet_'):
      return self.MODELS[m.name](num_classes=m.num_classes, rngs=rngs)
    return self.MODELS[m.name](num_classes=m.num_classes, stem=m.stem, in_channels=m.in_channels,
                               width=m.width, rngs=rngs)

  def load_pretrained(self, model, path):
    if isinstance(model, efficientnet.EfficientNetLite):
      efficientnet.load_torch(model, path)
    else:
      resnet.load_torchvision(model, path)

  @staticmethod
  def inputs(batch):
    """The model's positional inputs in a batch."""
    return (batch['image'],)

  @staticmethod
  def loss(model, batch):
    logits = model(batch['image'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
    return loss, {'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label'])}

  @staticmethod
  def eval_metrics(model, batch):
    correct = (jnp.argmax(model(batch['image']), -1) == batch['label']) * batch['valid']
    return {'correct': jnp.sum(correct), 'count': jnp.sum(batch['valid'])}


class _Bert(_Task):
  """What the BERT tasks share: the checkpoint directory (weights, config.json, tokenizer.json)."""

  def check(self, config):
    if config.model.name != 'bert':
      raise ValueError(f"config.model.name={config.model.name!r} is invalid for {config.task}: "
                       "use 'bert'")
    if not config.pretrained or not os.path.isdir(config.pretrained):
      raise FileNotFoundError(
          f'config.pretrained={config.pretrained!r} is not a directory: give a Hugging Face BERT '
          'checkpoint directory (model.safetensors, config.json, tokenizer.json), e.g. '
          'lowacc.models.bert.minilm_checkpoint_dir()')
    for name in ('model.safetensors', 'config.json'):
      if not os.path.isfile(os.path.join(config.pretrained, name)):
        raise FileNotFoundError(f'{name} is missing from the checkpoint directory '
                                f'config.pretrained={config.pretrained!r}')
    self.tokenizer = bert.load_tokenizer(config.pretrained)
    self.tokenizer.no_truncation()  # lowacc.data.text truncates and pads itself
    self.tokenizer.no_padding()
    self.sources(config)

  def bert_config(self):
    return bert.BertConfig.from_json(os.path.join(self.config.pretrained, 'config.json'))

  def load_pretrained(self, model, path):
    bert.load_hf_bert(model, path)

  @staticmethod
  def inputs(batch):
    return batch['input_ids'], batch['attention_mask'], batch['token_type_ids']


class TextClassification(_Bert):
  """BERT sequence classification on a GLUE task (tfds), the offline review set or an offline
  pair task (snli: its test set; boolq: its validation set); accuracy (Pearson correlation for
  the regression task stsb)."""

  def sources(self, config):
    if config.data.name == 'offline_text':
      return text.offline_text('train'), text.offline_text('test')
    if config.data.name == 'snli':
      return text.snli('train'), text.snli('test')
    if config.data.name == 'boolq':
      return text.boolq('train'), text.boolq('validation')
    if config.data.name != 'glue':
      raise ValueError(f"config.data.name={config.data.name!r} is invalid for "
                       "text_classification: valid values are 'glue', 'offline_text', 'snli', "
                       "'boolq'")
    task = config.data.glue_task
    valid = 'validation_matched' if task == 'mnli' else 'validation'
    return (text.glue(task, 'train', config.data.data_dir),
            text.glue(task, valid, config.data.data_dir))

  @property
  def num_labels(self):
    if self.config.data.name == 'offline_text':
      return 2
    if self.config.data.name in text.PAIR_TASKS:
      return text.PAIR_TASKS[self.config.data.name].num_labels
    return text.GLUE_TASKS[self.config.data.glue_task].num_labels

  def transform(self, train: bool):
    d = self.config.data
    if d.name == 'offline_text':
      return text.EncodeText(self.tokenizer, ('text',), d.max_length)
    if d.name in text.PAIR_TASKS:
      return text.pair_transform(self.tokenizer, d.name, d.max_length)
    return text.glue_transform(self.tokenizer, d.glue_task, d.max_length)

  def create_model(self, rngs):
    return bert.BertForSequenceClassification(self.bert_config(), self.num_labels, rngs=rngs)

  def loss(self, model, batch):
    out = model(*self.inputs(batch))
    if self.num_labels == 1:
      return jnp.mean((out[:, 0] - batch['label']) ** 2), {}
    loss = optax.softmax_cross_entropy_with_integer_labels(out, batch['label']).mean()
    return loss, {'accuracy': jnp.mean(jnp.argmax(out, -1) == batch['label'])}

  def eval_metrics(self, model, batch):
    out, v, y = model(*self.inputs(batch)), batch['valid'], batch['label']
    if self.num_labels == 1:
      p = out[:, 0]
      return {'count': jnp.sum(v), 'x': jnp.sum(v * p), 'y': jnp.sum(v * y),
              'xx': jnp.sum(v * p * p), 'yy': jnp.sum(v * y * y), 'xy': jnp.sum(v * p * y)}
    return {'correct': jnp.sum((jnp.argmax(out, -1) == y) * v), 'count': jnp.sum(v)}

  def summarize(self, totals):
    if self.num_labels != 1:
      return super().summarize(totals)
    n = totals['count']
    cov = totals['xy'] - totals['x'] * totals['y'] / n
    var = lambda k: totals[k + k] - totals[k] ** 2 / n
    return cov / np.sqrt(var('x') * var('y'))


class SpanPrediction(_Bert):
  """BERT extractive QA on SQuAD v1.1 (tfds); token-level F1 of the predicted answer span."""

  def sources(self, config):
    if config.data.name != 'squad':
      raise ValueError(f"config.data.name={config.data.name!r} is invalid for span_prediction: "
                       "use 'squad'")
    return (text.squad('train', config.data.data_dir),
            text.squad('validation', config.data.data_dir))

  def transform(self, train: bool):
    return text.EncodeSquad(self.tokenizer, self.config.data.max_length)

  def create_model(self, rngs):
    return bert.BertForSpanPrediction(self.bert_config(), rngs=rngs)

  def loss(self, model, batch):
    start, end = model(*self.inputs(batch))
    ce = optax.softmax_cross_entropy_with_integer_labels
    loss = (ce(start, batch['start_positions']).mean() + ce(end, batch['end_positions']).mean()) / 2
    return loss, {}

  def eval_metrics(self, model, batch):
    start, end = model(*self.inputs(batch))
    # The best span with start <= end, as BERT's SQuAD evaluation searches it.
    scores = start[:, :, None] + end[:, None, :]
    n = scores.shape[1]
    scores = jnp.where(jnp.triu(jnp.ones((n, n), bool)), scores, -jnp.inf)
    best = jnp.argmax(scores.reshape(scores.shape[0], -1), axis=-1)
    ps, pe = best // n, best % n
    gs, ge = batch['start_positions'], batch['end_positions']
    overlap = jnp.maximum(0, jnp.minimum(pe, ge) - jnp.maximum(ps, gs) + 1)
    precision, recall = overlap / (pe - ps + 1), overlap / (ge - gs + 1)
    f1 = jnp.where(overlap > 0, 2 * precision * recall / (precision + recall), 0.0)
    v = batch['valid']
    return {'f1': jnp.sum(f1 * v), 'count': jnp.sum(v)}

  def summarize(self, totals):
    return totals['f1'] / max(totals['count'], 1)


def create(config):
  tasks = {'image_classification': ImageClassification, 'text_classification': TextClassification,
           'span_prediction': SpanPrediction}
  if config.task not in tasks:
    raise ValueError(f'config.task={config.task!r} is invalid: valid values are {tuple(tasks)}')
  return tasks[config.task](config)
