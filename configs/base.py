"""The schema every experiment config shares, with defaults; experiment files override fields.

Not an experiment itself: configs/<name>.py calls `base.get_config()`, sets its own fields and
returns `base.variant(c, arg)` for `--config=configs/<name>.py[:arg]`.
"""

import ml_collections


def _phase(steps=-1, epochs=0.0, learning_rate=0.0, optimizer='sgd'):
  return ml_collections.ConfigDict(dict(
      steps=steps,            # -1: from epochs
      epochs=epochs,
      learning_rate=learning_rate,
      warmup_steps=0,
      final_lr_fraction=0.0,  # cosine decay to this fraction of learning_rate
      optimizer=optimizer,    # 'sgd' (nesterov momentum) or 'adamw'
      momentum=0.9,
      weight_decay=0.0,
  ))


def get_config():
  c = ml_collections.ConfigDict()
  c.name = 'experiment'
  c.task = 'image_classification'  # or 'text_classification', 'span_prediction'
  c.metric_name = 'accuracy'
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      name='resnet18',      # resnet18 | resnet34 | resnet50 | bert
      width=64,             # resnet: channels of conv1 and layer1
      stem='imagenet',      # resnet: 'imagenet' or 'cifar' (3x3 stride-1 conv1, no max pool)
      in_channels=3,
      num_classes=1000,
  ))
  c.pretrained = ''  # resnet: torchvision state dict (.safetensors); bert: HF checkpoint directory
  # A model another run exported (<workdir>/models/<phase>): its weights replace the pretrained ones,
  # e.g. to fine-tune a sweep's points from one float32 model.
  c.init_from = ''
  c.data = ml_collections.ConfigDict(dict(
      name='imagenet',      # mnist | fashion_mnist | imagenet | glue | squad | offline_text
      data_dir='',          # tfds data_dir for imagenet, glue, squad
      glue_task='sst2',
      max_length=128,
      batch_size=256,
      eval_batch_size=256,
      max_train_examples=0,  # 0: all
      max_eval_examples=0,   # 0: all
  ))
  # The simulated accumulator for fine-tuning (the paper's M7E4 by default).
  c.accumulator = ml_collections.ConfigDict(dict(
      format='M7E4b10',
      product=True,           # round products to the accumulator's widths, bias + offset
      product_bias_offset=2,  # the paper: 12 = 10 + log2(16) / 2
      chunk_size=16,
      order='fma',
      combine='acc',
      rounding='toward_zero',
      underflow='flush',      # stage 2's; stage 1 always runs with 'none'
      overflow='saturate',
      ste='identity',
      fp8_inputs=False,       # FP8 E4M3 weights and activations, per-tensor pow2 scale
      skip=(),                # layer-name patterns kept in float32, e.g. ('^conv1$', '^fc$')
      attention=True,         # simulate attention's two products too
  ))
  # Zero-shot evaluation formats: 'float32' or 'M<man>E<exp>[b<bias>]', other settings as above.
  c.zero_shot = ('float32', 'M10E5', 'M9E5', 'M8E5', 'M7E5', 'M6E5', 'M7E4b10')
  c.pretrain = _phase(steps=0)   # float32 training from scratch (offline demo only)
  c.stage1 = _phase(epochs=5.0, learning_rate=1e-3)
  c.stage2 = _phase(epochs=1.0, learning_rate=1e-4)
  # Both >= 1; the last step of a phase is always logged and checkpointed.
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3  # 0: none (a killed phase starts over from the previous phase's model)
  return c


def runlocal(c):
  """Shrinks any config to a smoke run of a few steps on tiny inputs."""
  if c.model.name.startswith('resnet'):
    c.model.width = 8
  c.data.batch_size = 4
  c.data.eval_batch_size = 4
  c.data.max_train_examples = 16
  c.data.max_eval_examples = 8
  c.data.max_length = min(c.data.max_length, 32)
  for phase in (c.pretrain, c.stage1, c.stage2):
    phase.steps = min(phase.steps, 2) if phase.steps >= 0 else 2
    phase.warmup_steps = 0
  c.zero_shot = ('float32', 'M7E4b10')
  c.log_every_steps = 1
  c.checkpoint_every_steps = 1
  return c


# What `--config=configs/<name>.py:<arg>` can ask for, besides the config itself.
VARIANTS = {'runlocal': runlocal}


def variant(c, arg):
  """`c` as `--config=file.py:arg` asks: `c` itself without an argument, VARIANTS[arg](c) with
  one; another argument is refused."""
  if arg in (None, ''):
    return c
  if arg not in VARIANTS:
    raise ValueError(f'config argument {arg!r} is invalid: valid are none (the full config) and '
                     f'{", ".join(map(repr, VARIANTS))}')
  return VARIANTS[arg](c)
