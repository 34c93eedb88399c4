"""Sequence model: a GRU with a learnable initial state and a linear readout at every time step.

The readout of every hidden state, the initial one included, is the model's *trajectory*: the output-state
history that trajectory distillation matches between teacher and student (t = 0 is the readout of h_0,
so even the start state is taught).
"""

from __future__ import annotations

import torch
from torch import nn

from kdlab.config.schema import ModelConfig


class GRUSequenceModel(nn.Module):
    """`forward(inputs [B,T,D_in]) -> {"logits": [B,C], "trajectory": [B,T+1,C]}`.

    `trajectory[:, t]` is the readout (linear, hidden -> C = num_classes) of the last GRU layer's hidden
    state after t steps; `trajectory[:, 0]` reads the learnable h_0 (a parameter [num_layers, 1, H],
    expanded over the batch) and `logits` = `trajectory[:, -1]`, the readout of h_T.
    """

    def __init__(self, cfg: ModelConfig, input_dim: int) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.num_classes = cfg.num_classes
        self.gru = nn.GRU(input_dim, cfg.hidden_size, num_layers=cfg.num_layers, batch_first=True)
        self.h0 = nn.Parameter(torch.zeros(cfg.num_layers, 1, cfg.hidden_size))
        self.readout = nn.Linear(cfg.hidden_size, cfg.num_classes)

    def forward(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        if inputs.ndim != 3 or inputs.shape[2] != self.input_dim:
            raise ValueError(
                f"GRUSequenceModel expects inputs [B, T, {self.input_dim}], got {tuple(inputs.shape)}"
            )
        h0 = self.h0.expand(-1, inputs.shape[0], -1).contiguous()
        states, _ = self.gru(inputs, h0)  # [B, T, H]: the last layer's state after each step
        states = torch.cat([h0[-1].unsqueeze(1), states], dim=1)  # [B, T+1, H]
        trajectory = self.readout(states)
        return {"logits": trajectory[:, -1], "trajectory": trajectory}
