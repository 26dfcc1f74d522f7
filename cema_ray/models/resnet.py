"""Small CIFAR-style ResNets with BatchNorm, for 28x28 and 32x32 inputs.

Three stages (widths w, 2w, 4w; strides 1, 2, 2) as in He et al.'s CIFAR ResNets. The edge
model is a ResNet-8 of width 16 (~78 k parameters); the foundation a ResNet-14 of width 32
(~0.7 M parameters, ~8x the compute), sized so both train on 2 CPU cores within the
pretraining budget, yet the foundation is clearly stronger and more robust.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(
        self, blocks: Sequence[int], width: int, num_classes: int = 10, in_chans: int = 3
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        planes, stages = width, []
        for i, n in enumerate(blocks):
            out = width * 2**i
            layers = [BasicBlock(planes, out, 1 if i == 0 else 2)]
            layers += [BasicBlock(out, out, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            planes = out
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def resnet_s(num_classes: int = 10, in_chans: int = 3) -> SmallResNet:
    """Edge-sized: ResNet-8, width 16."""
    return SmallResNet((1, 1, 1), 16, num_classes, in_chans)


def resnet_m(num_classes: int = 10, in_chans: int = 3) -> SmallResNet:
    """Between the two: ResNet-14, width 16 (for quick experiments)."""
    return SmallResNet((2, 2, 2), 16, num_classes, in_chans)


def resnet_l(num_classes: int = 10, in_chans: int = 3) -> SmallResNet:
    """Foundation-sized: ResNet-14, width 32."""
    return SmallResNet((2, 2, 2), 32, num_classes, in_chans)
