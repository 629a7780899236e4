"""ResNet-50 on ImageNet with FP8 E4M3 inputs and the paper's M7E4 accumulator, two stages (the
paper's 76.22% row; see imagenet_resnet18.py for the data and weights)."""

from configs import base, imagenet_resnet18


def get_config(arg=None):
  c = imagenet_resnet18.get_config()
  c.name = 'ImageNet ResNet-50, FP8 inputs, M7E4 accumulator'
  c.model.name = 'resnet50'
  c.accumulator.fp8_inputs = True
  return base.variant(c, arg)
