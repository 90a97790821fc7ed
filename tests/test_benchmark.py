"""`sdprune benchmark train` and the step modes it times."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from click.testing import CliRunner

from sdprune.benchmark import MODES, STAGE_MODES, BenchmarkConfig, ModeStep, masked_forward, run_benchmark, shortcuts_forward
from sdprune.cli import main
from sdprune.errors import InvalidValueError
from sdprune.resnet import build_model

TINY = ["benchmark", "train", "--arch", "resnet20", "--batch-size", "8", "--steps", "2", "--rounds", "3",
        "--warmup-steps", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def report() -> dict:
    result = CliRunner().invoke(main, TINY + ["--dataset", "digits", "--data-batches", "3", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_json_has_headline_keys(report):
    for key in ("skip_vs_constant", "mask_vs_constant", "expected_fraction", "time_weighted_fraction"):
        assert key in report
        assert report[key] > 0


def test_step_times_positive(report):
    for mode in MODES + STAGE_MODES:
        assert report["step_seconds"][mode] > 0
        assert len(report["round_step_seconds"][mode]) == 3
        assert report["images_per_second"][mode] == pytest.approx(8 / report["step_seconds"][mode])


def test_ratios_are_medians_of_rounds(report):
    rounds = report["round_step_seconds"]
    skip_ratios = [skip / constant for skip, constant in zip(rounds["skip"], rounds["constant"])]
    mask_ratios = [mask / constant for mask, constant in zip(rounds["mask"], rounds["constant"])]
    assert report["round_ratios"]["skip_vs_constant"] == pytest.approx(skip_ratios)
    assert report["skip_vs_constant"] == pytest.approx(statistics.median(skip_ratios))
    assert report["mask_vs_constant"] == pytest.approx(statistics.median(mask_ratios))
    assert report["skip_vs_time_weighted"] == pytest.approx(report["skip_vs_constant"] / report["time_weighted_fraction"])


def test_expected_fraction_is_mean_survival(report):
    # Linear rule over 9 blocks with p_L = 0.5: the mean of 1 - l/9 * 0.5 for l = 1..9.
    assert report["expected_fraction"] == pytest.approx(1 - 5 / 9 * 0.5)


def test_time_weighted_fraction_from_stage_and_block_times(report):
    branch = report["block_branch_seconds"]
    assert len(branch) == 9
    assert all(seconds >= 0 for seconds in branch)
    survival = [1 - index / 9 * 0.5 for index in range(1, 10)]
    rounds = report["round_step_seconds"]
    expected = []
    for round_index in range(3):
        constant, floor = rounds["constant"][round_index], rounds["shortcuts"][round_index]
        stage_seconds = [max(rounds[f"stage{stage}"][round_index] - floor, 0.0) for stage in (1, 2, 3)]
        weighted = 0.0
        for stage in range(3):
            # resnet20 has three blocks per stage.
            blocks = range(3 * stage, 3 * stage + 3)
            stage_branch = sum(branch[block] for block in blocks)
            for block in blocks:
                weight = stage_seconds[stage] / sum(stage_seconds) * branch[block] / stage_branch
                weighted += weight * survival[block]
        expected.append((floor + (constant - floor) * weighted) / constant)
    assert report["round_ratios"]["time_weighted_fraction"] == pytest.approx(expected)
    assert report["time_weighted_fraction"] == pytest.approx(statistics.median(expected))


def test_drawn_fraction_per_round(report):
    rounds = report["round_ratios"]
    assert len(rounds["drawn_time_fraction"]) == 3
    assert report["drawn_time_fraction"] == pytest.approx(statistics.median(rounds["drawn_time_fraction"]))
    expected = [skip / drawn for skip, drawn in zip(rounds["skip_vs_constant"], rounds["drawn_time_fraction"])]
    assert rounds["skip_vs_drawn_time_fraction"] == pytest.approx(expected)


def test_stage_shares_add_up_to_one(report):
    shares = report["stage_time_shares"]
    assert set(shares) == {"stage1", "stage2", "stage3", "shortcuts_stem_head"}
    assert sum(shares.values()) == pytest.approx(1.0)
    assert report["stage_sum_vs_constant"] > 0


def test_data_pipeline_measured(report):
    data = report["data"]
    assert data["dataset"] == "digits"
    assert data["images_per_second"] > 0
    assert data["train_images_per_second"] == pytest.approx(8 / report["step_seconds"]["skip"])
    assert data["loading_is_bottleneck"] == (data["images_per_second"] < data["train_images_per_second"])


def test_table_lists_modes_and_limits():
    result = CliRunner().invoke(main, TINY[:-2] + ["--steps", "1", "--rounds", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    for word in MODES + STAGE_MODES + ("expected_fraction", "time_weighted_fraction", "skip_vs_constant", "stage1"):
        assert word in result.output


@pytest.mark.parametrize("arguments, message", [
    (["--survival-last", "0"], "--survival-last must be in (0, 1], got 0.0"),
    (["--data-dir", "/tmp"], "--data-dir /tmp is set without --dataset"),
    (["--steps", "0"], "--steps"),
])
def test_invalid_options_rejected(arguments, message):
    result = CliRunner().invoke(main, TINY + arguments)
    assert result.exit_code == 2
    assert message in result.output


def test_config_rejects_zero_rounds():
    with pytest.raises(InvalidValueError, match="--rounds must be at least 1"):
        BenchmarkConfig(rounds=0)


def test_masked_forward_with_full_survival_is_constant_depth():
    model = build_model("resnet20").train()
    x = torch.randn(4, 3, 8, 8)
    expected = model(x, gates=[True] * 9)
    torch.testing.assert_close(masked_forward(model, x, [1.0] * 9), expected)


def test_masked_forward_with_zero_survival_drops_every_branch():
    model = build_model("resnet20").train()
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(masked_forward(model, x, [0.0] * 9), shortcuts_forward(model, x))


def test_shortcuts_forward_matches_all_gates_closed():
    model = build_model("resnet20").train()
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(shortcuts_forward(model, x), model(x, gates=[False] * 9))


def test_run_benchmark_records_drawn_gates():
    config = BenchmarkConfig(arch="resnet20", batch_size=2, steps=2, rounds=1, warmup_steps=0,
                             input_shape=(3, 8, 8), profile_repeats=1, survival_rule="uniform", survival_last=0.5)
    result = run_benchmark(config, torch.device("cpu"))
    assert len(result.drawn_survival) == 1
    assert all(share in (0.0, 0.5, 1.0) for share in result.drawn_survival[0])
    assert result.expected_fraction == pytest.approx(0.5)


def test_stage_mode_runs_only_its_stage():
    model = build_model("resnet20")
    config = BenchmarkConfig(arch="resnet20", input_shape=(3, 8, 8))
    step = ModeStep("stage2", model, torch.randn(2, 3, 8, 8), torch.tensor([0, 1]), config, torch.device("cpu"))
    ran = []
    for position, block in enumerate(step.model.blocks):
        block.branch.register_forward_hook(lambda *arguments, position=position: ran.append(position))
    step(0)
    assert ran == [3, 4, 5]
