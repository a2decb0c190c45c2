"""The seed's PyTorch model (seeds/000_5275fb1f86c29ea4.txt), written as the seed writes it.

k parallel ``Conv2d -> BatchNorm2d -> LeakyReLU`` branches; an MLP ``Flatten -> Linear -> LeakyReLU``
predicts a ``(batch, k)`` weight per sample; the answer stacks the branch outputs on dim 1, broadcasts
the weights to ``(b, n, 1, 1, 1)``, multiplies and sums over dim 1. A Python loop over the branches, as
in the question: this is the reference, not a fast formulation.
"""

from __future__ import annotations

import torch
from torch import nn


class SeedModel(nn.Module):
    """``x (B, C, H, W) -> (B, F, H', W')``: the gate-weighted sum of k conv branches.

    Args:
      in_channels: C.
      out_channels: F, every branch's output channels.
      num_branches: k.
      kernel_size, padding: every branch ``nn.Conv2d``'s (symmetric int padding).
      input_size: ``(H, W)``: the MLP's ``nn.Linear`` takes the flattened ``C * H * W`` input.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_branches: int,
        kernel_size: int,
        padding: int,
        input_size: tuple[int, int],
    ) -> None:
        super().__init__()
        height, width = input_size
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * height * width, num_branches), nn.LeakyReLU())
        self.convs = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding),
                    nn.BatchNorm2d(out_channels),
                    nn.LeakyReLU(),
                )
                for _ in range(num_branches)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv_weights = self.mlp(x)
        conv_outputs = []
        for conv in self.convs:
            conv_outputs.append(conv(x))
        conv_outputs = torch.stack(conv_outputs, dim=1)
        linear_comb = conv_weights[:, :, None, None, None] * conv_outputs
        return linear_comb.sum(1)
