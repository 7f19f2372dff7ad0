"""CI only: the model of wheel_search.toml, a tiny MLP (optitool.testing needs pytest, which a wheel install
without the dev extra does not have)."""

import torch


def make(hidden: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                               torch.nn.ReLU(), torch.nn.Linear(hidden, 4))
