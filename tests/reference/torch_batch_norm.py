"""Random running statistics and affine terms for a PyTorch model's BatchNorm2d layers, so that
comparisons in eval mode exercise them (fresh layers are the identity)."""

import torch


def randomize_batch_norm(model: torch.nn.Module) -> torch.nn.Module:
  """Draws every BatchNorm2d's weight, bias, running mean and variance from torch's global RNG."""
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.2)
        m.running_mean.normal_(0, 0.2)
        m.running_var.uniform_(0.5, 2.0)
  return model
