"""A small EDM-preconditioned MLP denoiser: the student for analytic (Gaussian-mixture) teachers."""
from __future__ import annotations

import math

import torch
from torch import nn


class MLPDenoiser(nn.Module):
    """D(x; sigma) = c_skip·x + c_out·F(c_in·x, c_noise) with F an MLP on the flattened sample (spec §1)."""

    def __init__(self, shape, hidden: int = 128, depth: int = 3, sigma_data: float = 0.5, dropout: float = 0.0,
                 num_freqs: int = 16):
        super().__init__()
        self.shape = tuple(shape)
        self.sigma_data = sigma_data
        dim = math.prod(self.shape)
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(100.0), num_freqs)))
        layers: list[nn.Module] = [nn.Linear(dim + 2 * num_freqs, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, sigma, labels=None, step=None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1).expand(x.shape[0], 1)
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1.0 / (sigma**2 + sd2).sqrt()
        angles = (sigma.log() / 4) * self.freqs
        h = torch.cat([c_in * x.reshape(x.shape[0], -1).float(), angles.sin(), angles.cos()], dim=1)
        out = c_skip * x.reshape(x.shape[0], -1).float() + c_out * self.net(h).float()
        return out.reshape(x.shape)
