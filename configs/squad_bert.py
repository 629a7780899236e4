"""BERT on SQuAD v1.1 (extractive spans, token-level F1) with the M7E4 accumulator:

python -m experiments.main --config=configs/squad_bert.py --workdir=runs/squad \\
    --config.data.data_dir=$HOME/tensorflow_datasets --config.pretrained=/path/to/hf/bert
"""

from configs import base


def get_config(arg=None):
  c = base.get_config()
  c.name = 'SQuAD v1.1 BERT, M7E4 accumulator'
  c.task = 'span_prediction'
  c.metric_name = 'f1'
  c.model.name = 'bert'
  c.data.update(name='squad', max_length=384, batch_size=32, eval_batch_size=64)
  c.pretrain.update(epochs=0.0, learning_rate=3e-5, optimizer='adamw', weight_decay=0.01)
  c.stage1.update(epochs=1.0, learning_rate=1e-5, optimizer='adamw', weight_decay=0.01)
  c.stage2.update(epochs=0.25, learning_rate=5e-6, optimizer='adamw', weight_decay=0.01)
  c.checkpoint_every_steps = 1000
  return base.variant(c, arg)
