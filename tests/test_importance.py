"""Tests of the block-importance measures against direct, uncached evaluations."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from sdprune.depth import draw_gates
from sdprune.errors import InvalidValueError
from sdprune.evaluate import evaluate_logits
from sdprune.importance import (
    analyze_model,
    flip_sweep,
    model_signature,
    norm_ratios,
    survival_contributions,
)
from sdprune.report import CSV_COLUMNS, format_importance_table, write_report
from sdprune.resnet import BlockSpec, CifarResNet, count_macs, count_parameters

CLASSES = 3


def tiny_specs(removed: tuple[int, ...] = ()) -> list[BlockSpec]:
    """Return five blocks over two stages, the third a transition, with falling survival."""
    shapes = [(1, 16, 16, 1), (1, 16, 16, 1), (2, 16, 32, 2), (2, 32, 32, 1), (2, 32, 32, 1)]
    return [
        BlockSpec(index, stage, channels_in, channels_out, stride, 1.0 - 0.1 * index, kept=index not in removed)
        for index, (stage, channels_in, channels_out, stride) in enumerate(shapes, start=1)
    ]


def tiny_model(removed: tuple[int, ...] = (), seed: int = 0) -> CifarResNet:
    """Build the tiny network with random weights and batch-norm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = CifarResNet(tiny_specs(removed), num_classes=CLASSES, in_channels=1)
    # Random running statistics and affine parameters keep the blocks from being near-identical.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    images = torch.randn(24, 1, 8, 8, generator=generator)
    labels = torch.randint(0, CLASSES, (24,), generator=generator)
    return [(images[:10], labels[:10]), (images[10:], labels[10:])]


def direct_evaluation(model: CifarResNet, batches, gates, test_scaling=None):
    with torch.no_grad():
        return evaluate_logits(lambda inputs: model(inputs, gates=gates, test_scaling=test_scaling), batches)


@pytest.fixture(scope="module")
def report(batches) -> dict:
    return analyze_model(tiny_model(), batches, "cpu", samples=3, seed=7)


def test_lesion_matches_uncached_evaluation(report, batches):
    model = tiny_model()
    full = direct_evaluation(model, batches, [True] * 5)
    assert report["full"]["accuracy"] == pytest.approx(full.accuracy)
    assert report["full"]["loss"] == pytest.approx(full.loss, rel=1e-5)
    assert [block["index"] for block in report["blocks"]] == [1, 2, 3, 4, 5]
    for position, block in enumerate(report["blocks"]):
        gates = [True] * 5
        gates[position] = False
        lesioned = direct_evaluation(model, batches, gates)
        assert block["lesion_accuracy"] == pytest.approx(lesioned.accuracy)
        assert block["lesion_loss"] == pytest.approx(lesioned.loss, rel=1e-5)
        assert block["lesion_accuracy_delta"] == pytest.approx(lesioned.accuracy - full.accuracy)
        assert block["lesion_loss_delta"] == pytest.approx(lesioned.loss - full.loss, rel=1e-4, abs=1e-6)


def test_lesion_effects_differ_between_blocks(report):
    # Equal figures for every block would mean the sweep removed nothing.
    assert len({round(block["lesion_loss"], 6) for block in report["blocks"]}) > 1


def test_flip_sweep_matches_uncached_both_ways(batches):
    model = tiny_model()
    gates = [True, False, True, False, True]
    with torch.no_grad():
        base, flipped = flip_sweep(model, batches, gates, range(5), test_scaling=False)
    assert base.loss == pytest.approx(direct_evaluation(model, batches, gates, test_scaling=False).loss, rel=1e-5)
    for position in range(5):
        other = list(gates)
        other[position] = not other[position]
        direct = direct_evaluation(model, batches, other, test_scaling=False)
        assert flipped[position].loss == pytest.approx(direct.loss, rel=1e-5)
        assert flipped[position].accuracy == pytest.approx(direct.accuracy)


def test_contribution_matches_direct_estimate(batches):
    model = tiny_model()
    with torch.no_grad():
        estimates = survival_contributions(model, batches, samples=2, seed=11)

    generator = torch.Generator().manual_seed(11)
    differences = {position: [] for position in range(5)}
    for _ in range(2):
        gates = draw_gates(model.survival, generator)
        for position in range(5):
            opened, closed = list(gates), list(gates)
            opened[position], closed[position] = True, False
            difference = (direct_evaluation(model, batches, closed, test_scaling=False).loss
                          - direct_evaluation(model, batches, opened, test_scaling=False).loss)
            differences[position].append(difference)

    for position, values in differences.items():
        mean = sum(values) / len(values)
        stderr = math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1) / len(values))
        assert estimates[position][0] == pytest.approx(mean, rel=1e-4, abs=1e-6)
        assert estimates[position][1] == pytest.approx(stderr, rel=1e-4, abs=1e-6)


def test_contribution_reproducible_under_seed(batches):
    model = tiny_model()
    with torch.no_grad():
        first = survival_contributions(model, batches, samples=3, seed=3)
        second = survival_contributions(model, batches, samples=3, seed=3)
        other = survival_contributions(model, batches, samples=3, seed=4)
    assert first == second
    assert first != other


def test_norm_ratio_matches_forward_hooks(report, batches):
    model = tiny_model()
    outputs: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for position, block in enumerate(model.blocks):
        for name in ("branch", "shortcut"):
            hook = lambda module, inputs, output, key=(position, name): outputs.__setitem__(key, output.clone())
            handles.append(getattr(block, name).register_forward_hook(hook))

    sums = [0.0] * 5
    with torch.no_grad():
        for inputs, _ in batches:
            model(inputs)
            for position, block in enumerate(model.blocks):
                branch = outputs[position, "branch"].flatten(1) * block.spec.survival_prob
                shortcut = outputs[position, "shortcut"].flatten(1)
                sums[position] += (branch.norm(dim=1) / shortcut.norm(dim=1)).sum().item()
    for handle in handles:
        handle.remove()

    for position, block in enumerate(report["blocks"]):
        assert block["norm_ratio"] == pytest.approx(sums[position] / 24, rel=1e-5)


def test_curve_runs_from_all_blocks_to_one(report):
    curve = report["curve"]
    assert [entry["blocks_kept"] for entry in curve] == [5, 4, 3, 2, 1]
    assert curve[0]["removed_block"] is None
    assert curve[0]["accuracy"] == report["full"]["accuracy"]
    assert report["removal_order"] == [entry["removed_block"] for entry in curve[1:]]
    assert len(set(report["removal_order"])) == 4
    assert set(report["removal_order"]) | set(curve[-1]["kept_blocks"]) == {1, 2, 3, 4, 5}


def test_curve_removes_cheapest_block_first(report):
    # The first removal is chosen from the lesion figures: highest accuracy, then lowest loss.
    best = max(report["blocks"], key=lambda block: (block["lesion_accuracy"], -block["lesion_loss"]))
    assert report["removal_order"][0] == best["index"]


def test_curve_figures_match_direct_evaluation(report, batches):
    model = tiny_model()
    for entry in report["curve"]:
        gates = [index in entry["kept_blocks"] for index in range(1, 6)]
        direct = direct_evaluation(model, batches, gates)
        assert entry["accuracy"] == pytest.approx(direct.accuracy)
        assert entry["loss"] == pytest.approx(direct.loss, rel=1e-5)

        removed = tuple(index for index in range(1, 6) if index not in entry["kept_blocks"])
        skeleton = CifarResNet(tiny_specs(removed), num_classes=CLASSES, in_channels=1)
        assert entry["params"] == count_parameters(skeleton)
        assert entry["macs"] == count_macs(skeleton, [1, 8, 8])
    assert report["curve"][-1]["params"] < report["curve"][0]["params"]


def test_pruned_model_analyzes_kept_blocks_only(batches):
    model = tiny_model(removed=(2, 4)).train()
    report = analyze_model(model, batches, "cpu", samples=2, seed=0)
    assert model.training, "analyze_model must restore training mode"
    assert [block["index"] for block in report["blocks"]] == [1, 3, 5]
    assert report["kept_blocks"] == [1, 3, 5]
    assert report["num_blocks"] == 5
    assert [entry["blocks_kept"] for entry in report["curve"]] == [3, 2, 1]
    assert not {2, 4} & set(report["removal_order"])
    for entry in report["curve"]:
        assert not {2, 4} & set(entry["kept_blocks"])

    gates = [True, False, False, False, True]
    lesioned = direct_evaluation(model.eval(), batches, gates)
    assert report["blocks"][1]["lesion_loss"] == pytest.approx(lesioned.loss, rel=1e-5)


def test_analyze_records_timing_and_check(report):
    timing = report["timing"]
    assert timing["plain_passes"] == 5
    assert timing["sweep_seconds"] > 0 and timing["plain_seconds"] > 0
    assert timing["sweep_cost_ratio"] == pytest.approx(timing["sweep_seconds"] / timing["plain_seconds"])
    assert report["lesion_check"]["max_loss_difference"] < 1e-5


def test_analyze_rejects_too_few_samples(batches):
    with pytest.raises(InvalidValueError, match="--samples must be at least 2"):
        analyze_model(tiny_model(), batches, "cpu", samples=1)


def test_analyze_rejects_empty_split():
    with pytest.raises(InvalidValueError, match="no images"):
        analyze_model(tiny_model(), [], "cpu", samples=2)


def test_analyze_rejects_model_without_kept_blocks(batches):
    with pytest.raises(InvalidValueError, match="no kept blocks"):
        analyze_model(tiny_model(removed=(1, 2, 3, 4, 5)), batches, "cpu", samples=2)


def test_signature_tracks_weights_and_structure():
    model = tiny_model()
    assert model_signature(model) == model_signature(tiny_model())
    changed = tiny_model()
    with torch.no_grad():
        changed.classifier.bias[0] += 1e-3
    assert model_signature(changed) != model_signature(model)
    assert model_signature(tiny_model(removed=(2,))) != model_signature(model)


def test_report_files_and_table(report, tmp_path):
    paths = write_report(tmp_path / "analysis", report)
    assert [path.name for path in paths] == ["importance.json", "importance.csv", "importance.png", "depth_curve.png"]
    assert json.loads(paths[0].read_text()) == report
    rows = list(csv.DictReader(paths[1].open()))
    assert [int(row["index"]) for row in rows] == [1, 2, 3, 4, 5]
    assert tuple(rows[0]) == CSV_COLUMNS
    for path in paths[2:]:
        assert path.read_bytes().startswith(b"\x89PNG")

    table = format_importance_table(report)
    assert "contribution" in table
    assert len(table.splitlines()) > len(report["blocks"]) + len(report["curve"])


def test_norm_ratios_skip_removed_blocks(batches):
    with torch.no_grad():
        ratios = norm_ratios(tiny_model(removed=(3,)), batches)
    assert sorted(ratios) == [0, 1, 3, 4]
    assert all(ratio > 0 for ratio in ratios.values())
