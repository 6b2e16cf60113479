"""torchvision's ResNet, written here in plain torch.nn (torchvision does not
install in the test environment), for the checkpoint-import tests.

The module and tensor names, shapes and order of a state dict are
torchvision's: `conv1`, `bn1`, `layer{1..4}.{j}` with `conv{k}`/`bn{k}` and
a `downsample` Sequential (conv, BN), `fc`; a bottleneck's stride is in its
3x3 conv (v1.5). `stem="cifar"` is the 3x3/1 conv without max-pool that
CIFAR ports use. Import only after `pytest.importorskip("torch")`.
"""

import torch
from torch import nn

# Blocks per stage and block type of each depth.
DEPTHS = {10: ("basic", (1, 1, 1, 1)), 18: ("basic", (2, 2, 2, 2)),
          34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3))}


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
  return nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False)


class Basic(nn.Module):
  expansion = 1

  def __init__(self, cin: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = _conv(cin, planes, 3, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = _conv(planes, planes, 3)
    self.bn2 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU()
    self.downsample = _downsample(cin, planes, stride)

  def forward(self, x):
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return self.relu(y + (x if self.downsample is None
                          else self.downsample(x)))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = _conv(cin, planes, 1)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = _conv(planes, planes, 3, stride)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = _conv(planes, planes * 4, 1)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU()
    self.downsample = _downsample(cin, planes * 4, stride)

  def forward(self, x):
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return self.relu(y + (x if self.downsample is None
                          else self.downsample(x)))


def _downsample(cin: int, cout: int, stride: int) -> nn.Module | None:
  if cin == cout and stride == 1:
    return None
  return nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
  """torchvision's ResNet (with its `fc` head) that also returns stages."""

  def __init__(self, depth: int, width: int = 64, stem: str = "imagenet",
               num_classes: int = 10):
    super().__init__()
    kind, blocks = DEPTHS[depth]
    block = Basic if kind == "basic" else Bottleneck
    if stem == "imagenet":
      self.conv1 = nn.Conv2d(3, width, 7, 2, padding=3, bias=False)
      self.maxpool = nn.MaxPool2d(3, 2, padding=1)
    else:
      self.conv1 = _conv(3, width, 3)
      self.maxpool = nn.Identity()
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU()
    cin = width
    for i, n in enumerate(blocks):
      layer = []
      for j in range(n):
        layer.append(block(cin, width * 2**i, 2 if i > 0 and j == 0 else 1))
        cin = width * 2**i * block.expansion
      setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
    self.fc = nn.Linear(cin, num_classes)

  def stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"res2".."res5"}: each layer's output, NCHW."""
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    out = {}
    for i in range(1, 5):
      x = getattr(self, f"layer{i}")(x)
      out[f"res{i + 1}"] = x
    return out

  def forward(self, x):
    return self.fc(self.stages(x)["res5"].mean((2, 3)))


def trained_like(depth: int, width: int = 64, stem: str = "imagenet",
                 seed: int = 0, size: int = 32) -> ResNet:
  """A ResNet with random weights and BN statistics of real batches.

  BN's affine parameters are drawn away from their init (1, 0), and a few
  training-mode passes over random images leave running statistics (and
  `num_batches_tracked`) that no init has; the model is returned in
  evaluation mode.

  Args:
    depth: 10, 18, 34 or 50.
    width: the stem's channels.
    stem: "imagenet" or "cifar".
    seed: torch's seed.
    size: the side of the random images.

  Returns:
    The model.
  """
  torch.manual_seed(seed)
  model = ResNet(depth, width, stem)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.1)
        m.momentum = 0.5
    model.train()
    for _ in range(3):
      model(torch.rand(4, 3, size, size) * 2 - 1)
  return model.eval()
