"""ResNet-34 on ImageNet with the paper's M7E4 accumulator (see imagenet_resnet18.py)."""

from configs import base, imagenet_resnet18


def get_config(arg=None):
  c = imagenet_resnet18.get_config()
  c.name = 'ImageNet ResNet-34, M7E4 accumulator'
  c.model.name = 'resnet34'
  return base.variant(c, arg)
