"""BERT fine-tuned on a GLUE task with the M7E4 accumulator; the task is a field:

python -m experiments.main --config=configs/glue_bert.py --workdir=runs/sst2 \\
    --config.data.glue_task=mnli --config.data.data_dir=$HOME/tensorflow_datasets \\
    --config.pretrained=/path/to/hf/bert-base-uncased  # model.safetensors, config.json, tokenizer.json

The checkpoint's task head is new (random): the 'baseline' row is then only meaningful for a
checkpoint already fine-tuned on the task; set --config.pretrain.steps=N to train it in float32
first.
"""

from configs import base


def get_config(arg=None):
  c = base.get_config()
  c.name = 'GLUE BERT, M7E4 accumulator'
  c.task = 'text_classification'
  c.model.name = 'bert'
  c.data.update(name='glue', glue_task='sst2', max_length=128, batch_size=32, eval_batch_size=64)
  c.pretrain.update(epochs=0.0, learning_rate=2e-5, optimizer='adamw', weight_decay=0.01)
  c.stage1.update(epochs=1.0, learning_rate=1e-5, optimizer='adamw', weight_decay=0.01)
  c.stage2.update(epochs=0.25, learning_rate=5e-6, optimizer='adamw', weight_decay=0.01)
  c.checkpoint_every_steps = 1000
  return base.variant(c, arg)
