"""Survival rules and gate drawing."""

import pytest
import torch

from sdprune.depth import draw_gates, gate_generator, survival_probabilities
from sdprune.errors import InvalidValueError


def test_linear_rule_matches_formula():
    probabilities = survival_probabilities("linear", 9, 0.5)
    expected = [1 - index / 9 * 0.5 for index in range(1, 10)]
    assert probabilities == pytest.approx(expected)
    assert probabilities[-1] == pytest.approx(0.5)
    assert probabilities[0] == pytest.approx(1 - 0.5 / 9)


def test_uniform_and_none_rules():
    assert survival_probabilities("uniform", 4, 0.8) == [0.8] * 4
    assert survival_probabilities("none", 4, 0.3) == [1.0] * 4


@pytest.mark.parametrize("value", [0.0, -0.1, 1.01])
def test_survival_last_out_of_range(value):
    with pytest.raises(InvalidValueError, match="survival-last"):
        survival_probabilities("linear", 9, value)


def test_unknown_rule_rejected():
    with pytest.raises(InvalidValueError, match="unknown survival rule"):
        survival_probabilities("exponential", 9)


def test_gates_follow_probabilities():
    probabilities = torch.tensor([1.0, 0.75, 0.25])
    counts = torch.zeros(3)
    for step in range(2000):
        counts += torch.tensor(draw_gates(probabilities, gate_generator(seed=3, step=step)), dtype=torch.float)
    frequencies = counts / 2000
    assert frequencies[0] == 1.0
    assert abs(frequencies[1] - 0.75) < 0.04
    assert abs(frequencies[2] - 0.25) < 0.04


def test_gates_reproducible_per_step():
    probabilities = torch.full((20,), 0.5)
    first = draw_gates(probabilities, gate_generator(7, 11))
    again = draw_gates(probabilities, gate_generator(7, 11))
    other_step = draw_gates(probabilities, gate_generator(7, 12))
    assert first == again
    assert first != other_step
