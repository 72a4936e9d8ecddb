"""Independent PyTorch pieces the parity tests build the reference models from (REFERENCE 3),
with the public code's module names (conv1, bn1, conv2, bn2, downsample)."""
import torch
from torch import nn


class BasicBlock(nn.Module):
  """torchvision's BasicBlock: two 3x3 convs with BatchNorm, a 1x1 projection shortcut."""

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

  def forward(self, x):
    y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
    return torch.relu(y + (x if self.downsample is None else self.downsample(x)))
