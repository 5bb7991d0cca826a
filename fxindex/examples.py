"""Built-in example models, used by ``fxindex demo``, the docs and the tests."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SeedModel", "seed_inputs"]


class SeedModel(nn.Module):
    """The model from the question fxindex answers: "how do I replace layer 4?".

    Six layers in execution order: ``conv1``, ``linear1``, ``module_list.0``,
    ``module_list.1``, ``nested.0``, ``nested.1``. Its forward hard-codes the
    flattened size ``16*26*26``, so widening ``conv1`` breaks a naive swap.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3)
        self.linear1 = nn.Linear(16 * 26 * 26, 128)
        self.module_list = nn.ModuleList([nn.Linear(128, 64), nn.Linear(64, 32)])
        self.nested = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = x.view(-1, 16 * 26 * 26)
        x = self.linear1(x)
        for layer in self.module_list:
            x = layer(x)
        return self.nested(x)


def seed_inputs(batch_size: int = 2) -> tuple[torch.Tensor]:
    """Example inputs for :class:`SeedModel`: ``batch_size`` RGB images of 28x28."""
    return (torch.randn(batch_size, 3, 28, 28),)
