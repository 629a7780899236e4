"""ResNet-18 on ImageNet with the paper's M7E4 accumulator (b_acc 10, b_prod 12, chunks of 16).

Point it at a TFDS data_dir holding imagenet2012 (array_record) and at torchvision weights saved
as safetensors (lowacc.models.resnet.save_torchvision, or safetensors.torch.save_file of a
torchvision state dict):

python -m experiments.main --config=configs/imagenet_resnet18.py --workdir=runs/r18 \\
    --config.data.data_dir=$HOME/tensorflow_datasets --config.pretrained=resnet18.safetensors
"""

from configs import base


def get_config(arg=None):
  c = base.get_config()
  c.name = 'ImageNet ResNet-18, M7E4 accumulator'
  c.model.update(name='resnet18', stem='imagenet', num_classes=1000)
  c.data.update(name='imagenet', batch_size=256, eval_batch_size=250)
  # The paper fine-tunes 5 epochs with underflow off, then 1 with it on; its optimizer and
  # learning rates are not known: SGD with a small cosine-decayed rate is lowacc's choice.
  c.stage1.update(epochs=5.0, learning_rate=1e-3, optimizer='sgd', weight_decay=1e-4)
  c.stage2.update(epochs=1.0, learning_rate=1e-4, optimizer='sgd', weight_decay=1e-4)
  c.checkpoint_every_steps = 1000
  return base.variant(c, arg)
