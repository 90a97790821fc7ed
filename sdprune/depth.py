"""Survival rules and gates of stochastic depth.

Huang et al. 2016, "Deep Networks with Stochastic Depth": during training, residual
block l of L runs its branch with probability p_l and otherwise passes only its
shortcut; at test time every block runs and scales its branch by p_l. This module
is the one place that decides which blocks run.
"""

from __future__ import annotations

import torch

from sdprune.errors import InvalidValueError

SURVIVAL_RULES = ("linear", "uniform", "none")


def survival_probabilities(rule: str, num_blocks: int, survival_last: float = 0.5) -> list[float]:
    """Return p_l for blocks l = 1..num_blocks under a survival rule.

    `linear` decays from 1 at the input towards `survival_last` at block L,
    p_l = 1 - l / L * (1 - p_L); `uniform` gives every block `survival_last`;
    `none` gives every block 1 (constant depth).
    """
    if rule not in SURVIVAL_RULES:
        raise InvalidValueError(
            f"unknown survival rule {rule!r}: use one of {', '.join(SURVIVAL_RULES)}"
        )
    if not 0.0 < survival_last <= 1.0:
        raise InvalidValueError(
            f"survival-last must be in (0, 1], got {survival_last}"
        )
    if num_blocks < 1:
        raise InvalidValueError(f"a network needs at least 1 residual block, got {num_blocks}")

    if rule == "none":
        return [1.0] * num_blocks
    if rule == "uniform":
        return [float(survival_last)] * num_blocks
    return [1.0 - index / num_blocks * (1.0 - survival_last) for index in range(1, num_blocks + 1)]


def draw_gates(probabilities: torch.Tensor, generator: torch.Generator | None = None) -> list[bool]:
    """Draw one Bernoulli gate per block: True means the block's branch runs.

    `probabilities` is a 1-D CPU float tensor of survival probabilities. The draw
    happens on the CPU so that every DDP rank seeded alike draws the same gates,
    whatever device it trains on.
    """
    draws = torch.rand(probabilities.shape, generator=generator)
    return (draws < probabilities).tolist()


def gate_generator(seed: int, step: int) -> torch.Generator:
    """Return a CPU generator seeded from the run seed and the global step.

    Seeding from (seed, step) rather than carrying one stream along makes a
    resumed run and every DDP rank draw exactly the same gates for a step.
    """
    generator = torch.Generator()
    generator.manual_seed((seed * 1_000_003 + step) % (2**63 - 1))
    return generator
