"""Block pruning: strategies, the smaller network, recalibration and the prune command."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from sdprune.cli import main
from sdprune.errors import InvalidValueError, RunFolderError
from sdprune.prune import (
    every_other_removed,
    fold_survival_scaling,
    keep_depth_for_ratio,
    prune_model,
    removal_order,
    removed_blocks,
)
from sdprune.prune_run import PruneConfig, search_depth
from sdprune.recalibrate import batch_norm_layers, recalibrate_batch_norm
from sdprune.resnet import build_model, count_macs, count_parameters
from sdprune.runs import load_run, save_run

ALL_BLOCKS = list(range(1, 10))


def trained_looking(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every batch norm random statistics and affine weights, as training would, so outputs differ per block."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in batch_norm_layers(model):
            size = layer.num_features
            layer.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
            layer.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            layer.weight.copy_(torch.rand(size, generator=generator) + 0.5)
            layer.bias.copy_(torch.randn(size, generator=generator) * 0.1)
    return model


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return trained_looking(build_model("resnet20", num_classes=10, in_channels=1), seed).eval()


@pytest.fixture(scope="module")
def digits_parent(tmp_path_factory) -> Path:
    """Save an untrained resnet20 for digits as a run folder with a 200-image validation split."""
    folder = tmp_path_factory.mktemp("prune") / "parent"
    save_run(folder, tiny_model(), {
        "arch": "resnet20",
        "classes": [str(digit) for digit in range(10)],
        "input_shape": [1, 8, 8],
        "mean": [0.3],
        "std": [0.4],
        "survival_rule": "linear",
        "survival_last": 0.5,
        "seed": 0,
        "data": {"dataset": "digits", "data_dir": None, "val_split": 200, "limit_train": 400, "limit_test": 200},
        "parent": None,
        "training": None,
    })
    return folder


def invoke(*arguments: str):
    return CliRunner().invoke(main, ["prune", *arguments])


# The pruned network against the parent with the same gates closed.

@pytest.mark.parametrize("removed", [[2], [4], [4, 7, 9], [1, 2, 3, 5, 6, 8, 9]])
def test_pruned_outputs_equal_closed_gates(removed):
    model = tiny_model()
    pruned = prune_model(model, removed)
    images = torch.randn(6, 1, 8, 8)
    gates = [index not in removed for index in ALL_BLOCKS]

    with torch.no_grad():
        expected = model(images, gates=gates)
        actual = pruned(images)

    assert pruned.kept_indices == [index for index in ALL_BLOCKS if index not in removed]
    assert torch.equal(actual, expected)


def test_pruned_outputs_differ_from_full_network():
    model = tiny_model()
    images = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(prune_model(model, [2])(images), model(images))


def test_pruning_a_pruned_model_matches_parent():
    model = tiny_model()
    twice = prune_model(prune_model(model, [9]), [4, 5])
    images = torch.randn(4, 1, 8, 8)
    gates = [index not in (4, 5, 9) for index in ALL_BLOCKS]

    with torch.no_grad():
        assert torch.equal(twice(images), model(images, gates=gates))
    assert twice.kept_indices == [1, 2, 3, 6, 7, 8]


def test_prune_leaves_parent_unchanged():
    model = tiny_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    pruned = prune_model(model, [3])
    with torch.no_grad():
        pruned.blocks[0].branch[0].weight.add_(1.0)

    assert model.kept_indices == ALL_BLOCKS
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_state_dict_holds_only_kept_blocks(tmp_path):
    model = tiny_model()
    pruned = prune_model(model, [4, 8])
    save_run(tmp_path, pruned, {"classes": list("0123456789"), "input_shape": [1, 8, 8], "mean": [0.0], "std": [1.0]})
    tensors = load_file(str(tmp_path / "model.safetensors"))

    block_positions = {int(name.split(".")[1]) for name in tensors if name.startswith("blocks.")}
    assert block_positions == {0, 1, 2, 4, 5, 6, 8}
    assert count_parameters(pruned) < count_parameters(model)
    assert count_macs(pruned, [1, 8, 8]) < count_macs(model, [1, 8, 8])

    loaded = load_run(tmp_path)
    images = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.model(images), pruned.eval()(images))


def test_removed_transition_block_has_no_parameters():
    pruned = prune_model(tiny_model(), [4])
    assert pruned.blocks[3].branch is None
    assert not list(pruned.blocks[3].parameters())
    assert pruned(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_binary_layers_stay_binary_after_pruning():
    from sdprune.binarize import binarize_model, binary_layer_names

    model = tiny_model()
    binarize_model(model)
    pruned = prune_model(model, [4, 9])
    images = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(pruned(images), model(images, gates=[index not in (4, 9) for index in ALL_BLOCKS]))
    assert "blocks.3.branch.0" not in binary_layer_names(pruned)
    assert len(binary_layer_names(pruned)) == len(binary_layer_names(model)) - 4


@pytest.mark.parametrize("removed", [[10], [0], ALL_BLOCKS])
def test_prune_rejects_invalid_blocks(removed):
    with pytest.raises(InvalidValueError):
        prune_model(tiny_model(), removed)


def test_fold_survival_keeps_eval_outputs():
    pruned = prune_model(tiny_model(), [7, 8])
    images = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        before = pruned(images)
        fold_survival_scaling(pruned)
        after = pruned(images)

    assert all(spec.survival_prob == 1.0 for spec in pruned.specs if spec.kept)
    assert pruned.survival[pruned.kept_indices[0] - 1] == 1.0
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_assign_survival_counts_kept_blocks():
    from sdprune.prune import assign_survival

    pruned = assign_survival(prune_model(tiny_model(), [3, 6, 7, 8, 9]), "linear", 0.5)
    kept = [spec.survival_prob for spec in pruned.specs if spec.kept]
    assert kept == [0.875, 0.75, 0.625, 0.5]
    assert [block.spec.survival_prob for block in pruned.blocks if block.branch is not None] == kept
    assert pruned.survival.tolist()[:2] == [0.875, 0.75]


# Strategies.

def hand_made_report() -> dict:
    # Lesion, contribution and norm rank blocks in different orders, so each strategy is told apart.
    lesion = {1: -0.40, 2: -0.30, 3: -0.10, 4: -0.25, 5: -0.08, 6: -0.03, 7: -0.02, 8: -0.02, 9: -0.01}
    lesion_loss = {index: -10 * delta for index, delta in lesion.items()}
    lesion_loss[7] = 0.1
    contribution = {1: 0.9, 2: 0.05, 3: 0.4, 4: 0.8, 5: 0.3, 6: 0.2, 7: 0.1, 8: 0.01, 9: 0.6}
    norm = {1: 0.5, 2: 0.6, 3: 0.7, 4: 0.9, 5: 0.1, 6: 0.2, 7: 0.3, 8: 0.4, 9: 0.8}
    return {
        "model_signature": "sha256:made-up",
        "blocks": [
            {"index": index, "lesion_accuracy_delta": lesion[index], "lesion_loss_delta": lesion_loss[index],
             "contribution_mean": contribution[index], "contribution_stderr": 0.01, "norm_ratio": norm[index]}
            for index in ALL_BLOCKS
        ],
        "removal_order": [9, 7, 6, 8, 5, 3, 2, 4],
    }


@pytest.mark.parametrize("strategy, expected", [
    ("last", [9, 8, 7, 6, 5, 4, 3, 2, 1]),
    ("greedy", [9, 7, 6, 8, 5, 3, 2, 4, 1]),
    ("lesion", [9, 7, 8, 6, 5, 3, 4, 2, 1]),
    ("contribution", [8, 2, 7, 6, 5, 3, 9, 4, 1]),
    ("norm", [5, 6, 7, 8, 1, 2, 3, 9, 4]),
])
def test_ranking_strategy_orders(strategy, expected):
    assert removal_order(strategy, ALL_BLOCKS, hand_made_report()) == expected


def test_orders_cover_only_kept_blocks():
    kept = [1, 2, 3, 5, 6, 8]
    report = hand_made_report()
    assert removal_order("last", kept) == [8, 6, 5, 3, 2, 1]
    assert removal_order("norm", kept, report) == [5, 6, 8, 1, 2, 3]
    report["removal_order"] = [8, 6, 5, 2, 3]
    assert removal_order("greedy", kept, report) == [8, 6, 5, 2, 3, 1]


def test_greedy_rejects_order_of_other_blocks():
    report = hand_made_report()
    with pytest.raises(RunFolderError):
        removal_order("greedy", [1, 2, 3, 5], report)


def test_report_without_figures_rejected():
    report = hand_made_report()
    del report["blocks"][3]["norm_ratio"]
    with pytest.raises(RunFolderError, match="norm_ratio"):
        removal_order("norm", ALL_BLOCKS, report)


@pytest.mark.parametrize("depth, removed", [
    (9, []),
    (8, [9]),          # k = 9
    (7, [8, 4]),       # k = 4
    (6, [9, 6, 3]),    # k = 3
    (5, [8, 6, 4, 2]), # k = 2
    (4, [9, 8, 6, 4, 2]),       # keeps 1, 3, 5, 7
    (3, [9, 8, 6, 5, 3, 2]),    # keeps 1, 4, 7
    (2, [9, 8, 7, 6, 4, 3, 2]), # keeps 1, 5
    (1, [9, 8, 7, 6, 5, 4, 3, 2]),
])
def test_every_other_rule_nine_blocks(depth, removed):
    assert every_other_removed(ALL_BLOCKS, depth) == removed


def test_every_other_uses_positions_among_kept_blocks():
    kept = [1, 2, 4, 5, 7, 8, 9]
    assert every_other_removed(kept, 4) == [8, 5, 2]  # positions 6, 4, 2
    # k = 2 gives 13 even positions; only the 10 deepest go, so position 8 is the last removed.
    assert every_other_removed(list(range(1, 28)), 17) == list(range(26, 7, -2))


@pytest.mark.parametrize("total", [2, 3, 9, 18, 27, 54])
def test_every_other_reaches_each_depth(total):
    blocks = list(range(1, total + 1))
    for depth in range(1, total + 1):
        removed = every_other_removed(blocks, depth)
        assert len(set(removed)) == total - depth
        assert set(removed) <= set(blocks)


def test_removed_blocks_takes_order_prefix():
    assert removed_blocks("greedy", ALL_BLOCKS, 6, hand_made_report()) == [9, 7, 6]
    assert removed_blocks("lesion", ALL_BLOCKS, 9) == []


@pytest.mark.parametrize("ratio, depth", [(1.0, 9), (0.5, 5), (0.34, 3), (0.06, 1)])
def test_keep_ratio_rounds_half_up(ratio, depth):
    assert keep_depth_for_ratio(ratio, 9) == depth


def test_keep_ratio_keeping_nothing_rejected():
    with pytest.raises(InvalidValueError, match="keeps round"):
        keep_depth_for_ratio(0.05, 9)


def test_search_stops_at_first_depth_beyond_drop():
    model = tiny_model()
    images = torch.randn(40, 1, 8, 8)
    with torch.no_grad():
        labels = model(images).argmax(dim=1)
    batches = [(images, labels)]

    removed, tried = search_depth(model, lambda depth: removal_order("last", ALL_BLOCKS)[: 9 - depth],
                                  batches, 1.0, 100.0, "cpu")
    assert removed == [9, 8, 7, 6, 5, 4, 3, 2]
    assert [entry["blocks"] for entry in tried] == list(range(8, 0, -1))

    removed, tried = search_depth(model, lambda depth: removal_order("last", ALL_BLOCKS)[: 9 - depth],
                                  batches, 1.0, 0.0, "cpu")
    first_miss = next(entry for entry in tried if not entry["within"])
    assert tried[-1] is first_miss
    assert removed == (tried[-2]["removed_blocks"] if len(tried) > 1 else [])


# Batch-norm recalibration.

def test_recalibration_changes_statistics_only():
    model = prune_model(tiny_model(), [5, 6]).eval()
    weights = {name: parameter.clone() for name, parameter in model.named_parameters()}
    means = [layer.running_mean.clone() for layer in batch_norm_layers(model)]
    momenta = [layer.momentum for layer in batch_norm_layers(model)]
    batches = [(torch.randn(16, 1, 8, 8) * 2 + 1, torch.zeros(16, dtype=torch.long)) for _ in range(4)]
    stem_convolution = model.stem[0]
    with torch.no_grad():
        seen = [batches[0][0], batches[1][0], batches[2][0], batches[3][0][:2]]
        expected_mean = torch.stack([stem_convolution(images).mean(dim=(0, 2, 3)) for images in seen]).mean(dim=0)

    used = recalibrate_batch_norm(model, batches, 50, generator=torch.Generator().manual_seed(0))

    assert used == 50
    assert not model.training
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, weights[name]), name
        assert parameter.grad is None
    layers = batch_norm_layers(model)
    assert [layer.momentum for layer in layers] == momenta
    assert not torch.allclose(layers[1].running_mean, means[1])
    # The stem's batch norm sees every batch, the last one cut to 2 images, and weighs each batch equally.
    assert int(layers[0].num_batches_tracked) == 4
    torch.testing.assert_close(layers[0].running_mean, expected_mean)


def test_random_gates_reproducible_under_seed():
    batches = [(torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)) for _ in range(3)]
    results = []
    for seed in (3, 3, 4):
        model = prune_model(tiny_model(), [9])
        recalibrate_batch_norm(model, batches, 24, generator=torch.Generator().manual_seed(seed), gates="random")
        results.append(model.state_dict())
    for name, tensor in results[0].items():
        assert torch.equal(tensor, results[1][name]), name
    assert any(not torch.equal(tensor, results[2][name]) for name, tensor in results[0].items())


def test_open_gates_use_eval_path_statistics():
    model = prune_model(tiny_model(), [2, 7])
    images = torch.randn(16, 1, 8, 8)

    # Batch norm in training mode normalizes with batch statistics only, so a copy shows
    # what each layer receives on the eval-time path (all kept blocks, scaled by p_l).
    probe = prune_model(model, []).train()
    seen = {}

    def record_mean(name: str):
        def hook(module, inputs) -> None:
            seen[name] = inputs[0].mean(dim=(0, 2, 3))
        return hook

    for name, module in probe.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_pre_hook(record_mean(name))
    with torch.no_grad():
        probe(images, gates=[True] * 9, test_scaling=True)

    recalibrate_batch_norm(model, [(images, torch.zeros(16, dtype=torch.long))], 16,
                           generator=torch.Generator().manual_seed(0))
    layers = dict(model.named_modules())
    assert len(seen) == 1 + 2 * 7
    for name, mean in seen.items():
        torch.testing.assert_close(layers[name].running_mean, mean, msg=name)


def test_open_gates_ignore_generator():
    batches = [(torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)) for _ in range(2)]
    results = []
    for seed in (0, 1):
        model = prune_model(tiny_model(), [9])
        recalibrate_batch_norm(model, batches, 16, generator=torch.Generator().manual_seed(seed))
        results.append(model.state_dict())
    for name, tensor in results[0].items():
        assert torch.equal(tensor, results[1][name]), name


def test_recalibration_rejects_unknown_gates():
    with pytest.raises(ValueError, match="gates must be one of open, random"):
        recalibrate_batch_norm(tiny_model(), [], 10, gates="closed")


# Config checks.

@pytest.mark.parametrize("values, message", [
    ({}, "no target given"),
    ({"keep_depth": 3, "keep_ratio": 0.5}, "--keep-depth and --keep-ratio were given together"),
    ({"keep_depth": 3, "keep_ratio": 0.5, "max_accuracy_drop": 1.0}, "and --max-accuracy-drop were given together"),
    ({"keep_depth": 0}, "--keep-depth must be between 1 and 9 (the model has 9 blocks), got 0"),
])
def test_target_depth_rejects(values, message):
    from sdprune.prune_run import target_depth

    with pytest.raises(InvalidValueError, match=re.escape(message)):
        target_depth(PruneConfig(**values), 9)


def test_target_depth_resolves_ratio():
    from sdprune.prune_run import target_depth

    assert target_depth(PruneConfig(keep_ratio=0.5), 9) == 5
    assert target_depth(PruneConfig(keep_depth=9), 9) == 9
    assert target_depth(PruneConfig(max_accuracy_drop=1.0), 9) is None


@pytest.mark.parametrize("values, message", [
    ({"keep_ratio": 1.5}, "--keep-ratio must be in"),
    ({"max_accuracy_drop": -1.0}, "--max-accuracy-drop must be between 0 and 100"),
    ({"keep_depth": 3, "strategy": "random"}, "--strategy must be one of"),
    ({"keep_depth": 3, "survival_last": 0.0}, "--survival-last must be in"),
    ({"keep_depth": 3, "recalibration_gates": "closed"}, "--recalibration-gates must be one of open, random"),
])
def test_prune_config_rejects(values, message):
    with pytest.raises(InvalidValueError, match=message):
        PruneConfig(**values)


# The command.

@pytest.mark.parametrize("arguments, message", [
    (["--keep-depth", "0"], "--keep-depth must be between 1 and 9 (the model has 9 blocks), got 0"),
    (["--keep-depth", "10"], "--keep-depth must be between 1 and 9 (the model has 9 blocks), got 10"),
    ([], "no target given: add one of --keep-depth N (1 to 9), --keep-ratio R (above 0, at most 1) "
         "or --max-accuracy-drop PTS (0 to 100)"),
    (["--keep-depth", "3", "--max-accuracy-drop", "1"],
     "--keep-depth and --max-accuracy-drop were given together: choose one of --keep-depth N (1 to 9)"),
    (["--keep-ratio", "0.01"], "keeps round(0.01 x 9) = 0 blocks"),
])
def test_cli_rejects_targets(digits_parent, tmp_path, arguments, message):
    result = invoke(str(digits_parent), "--out", str(tmp_path / "out"), *arguments)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_cli_rejects_missing_run(tmp_path):
    result = invoke(str(tmp_path / "absent"), "--out", str(tmp_path / "out"), "--keep-depth", "3")
    assert result.exit_code == 2
    assert "not found" in result.output


def test_cli_rejects_report_of_other_model(digits_parent, tmp_path):
    report = tmp_path / "importance.json"
    report.write_text(json.dumps(hand_made_report()))
    result = invoke(str(digits_parent), "--out", str(tmp_path / "out"), "--keep-depth", "5",
                    "--importance", str(report))
    assert result.exit_code == 2, result.output
    assert "was made for another model" in result.output


def test_cli_accepts_report_of_this_model(digits_parent, tmp_path):
    from sdprune.importance import model_signature

    report = hand_made_report()
    report["model_signature"] = model_signature(load_run(digits_parent).model)
    path = tmp_path / "importance.json"
    path.write_text(json.dumps(report))
    result = invoke(str(digits_parent), "--out", str(tmp_path / "out"), "--keep-depth", "6",
                    "--strategy", "norm", "--importance", str(path), "--no-recalibrate", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["removed_blocks"] == [5, 6, 7]


def test_cli_writes_smaller_run(digits_parent, tmp_path):
    out = tmp_path / "pruned"
    result = invoke(str(digits_parent), "--out", str(out), "--keep-depth", "5", "--strategy", "every-other",
                    "--recalibration-images", "64")
    assert result.exit_code == 0, result.output
    assert "recalibrated" in result.output

    report = json.loads((out / "prune_report.json").read_text())
    config = json.loads((out / "model.json").read_text())
    assert report["removed_blocks"] == [8, 6, 4, 2]
    names = [row["stage"] for row in report["stages"]]
    if report["recalibration_kept"]:
        assert names == ["unpruned", "blocks removed", "recalibrated"]
    else:
        assert names == ["unpruned", "blocks removed", "recalibrated (discarded)", "statistics restored"]
    assert report["stages"][1]["params"] < report["stages"][0]["params"]
    assert report["stages"][1]["macs"] < report["stages"][0]["macs"]
    assert report["recalibration_images"] == 64
    assert config["kept_blocks"] == [1, 3, 5, 7, 9]
    assert config["removed_blocks"] == [2, 4, 6, 8]
    assert config["parent"] == str(digits_parent.resolve())
    assert config["strategy"] == "every-other"
    assert config["data"]["val_split"] == 200

    info = CliRunner().invoke(main, ["info", str(out), "--json"])
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout)["kept_blocks"] == [1, 3, 5, 7, 9]
    evaluation = CliRunner().invoke(main, ["evaluate", str(out), "--json"])
    assert evaluation.exit_code == 0, evaluation.output
    recorded = report["stages"][-1]["test_accuracy"]
    assert json.loads(evaluation.stdout)["accuracy"] == pytest.approx(recorded)


def test_cli_output_before_recalibration_matches_parent(digits_parent, tmp_path):
    out = tmp_path / "pruned"
    result = invoke(str(digits_parent), "--out", str(out), "--keep-depth", "7", "--strategy", "last",
                    "--no-recalibrate", "--json")
    assert result.exit_code == 0, result.output

    parent = load_run(digits_parent).model
    pruned = load_run(out).model
    images = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(pruned(images), parent(images, gates=[index <= 7 for index in ALL_BLOCKS]))


def test_cli_prunes_pruned_run_counting_kept_blocks(digits_parent, tmp_path):
    first = tmp_path / "first"
    assert invoke(str(digits_parent), "--out", str(first), "--keep-depth", "5", "--strategy", "last",
                  "--no-recalibrate").exit_code == 0

    result = invoke(str(first), "--out", str(tmp_path / "second"), "--keep-depth", "6")
    assert result.exit_code == 2
    assert "--keep-depth must be between 1 and 5 (the model has 5 blocks), got 6" in result.output

    result = invoke(str(first), "--out", str(tmp_path / "second"), "--keep-ratio", "0.4", "--strategy",
                    "every-other", "--no-recalibrate", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["kept_blocks"] == [1, 3]


def test_cli_max_accuracy_drop_full_range(digits_parent, tmp_path):
    result = invoke(str(digits_parent), "--out", str(tmp_path / "out"), "--max-accuracy-drop", "100",
                    "--strategy", "last", "--no-recalibrate", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["kept_blocks"] == [1]
    assert report["selection_split"] == "val"
    assert [entry["blocks"] for entry in report["search"]] == list(range(8, 0, -1))


def test_cli_finetunes_and_resumes(digits_parent, tmp_path):
    out = tmp_path / "tuned"
    result = invoke(str(digits_parent), "--out", str(out), "--keep-depth", "4", "--strategy", "last",
                    "--recalibration-images", "64", "--finetune-epochs", "1", "--limit-train", "128")
    assert result.exit_code == 0, result.output

    report = json.loads((out / "prune_report.json").read_text())
    config = json.loads((out / "model.json").read_text())
    assert report["stages"][-1]["stage"] == "fine-tuned"
    assert report["finetuning"]["epochs_completed"] == 1
    assert config["training"]["epochs_completed"] == 1
    assert config["kept_blocks"] == [1, 2, 3, 4]
    assert all(block["survival_prob"] == 1.0 for block in config["blocks"] if block["kept"])
    assert config["strategy"] == "last"

    again = CliRunner().invoke(main, ["prune", "--resume", str(out)])
    assert again.exit_code == 2
    assert "already finished all 1 fine-tuning epochs" in again.output

    # One more epoch in the saved settings makes the run resumable from its training state.
    report["finetuning"]["epochs"] = 2
    report["finetuning"]["train_config"]["epochs"] = 2
    (out / "prune_report.json").write_text(json.dumps(report))
    resumed = CliRunner().invoke(main, ["prune", "--resume", str(out), "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["finetuning"]["epochs_completed"] == 2
    assert [line["epoch"] for line in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2]


def test_cli_resume_rejects_targets(tmp_path):
    result = CliRunner().invoke(main, ["prune", "--resume", str(tmp_path), "--keep-depth", "3"])
    assert result.exit_code == 2
    assert "continues with the saved settings" in result.output


def test_finetune_config_constant_depth(digits_parent):
    from sdprune.prune_run import finetune_config

    parent = load_run(digits_parent)
    constant = finetune_config(PruneConfig(keep_depth=3, finetune_epochs=2), parent)
    stochastic = finetune_config(PruneConfig(keep_depth=3, finetune_epochs=2, survival_last=0.8), parent)
    assert (constant.survival_rule, constant.epochs) == ("none", 2)
    assert (stochastic.survival_rule, stochastic.survival_last) == ("linear", 0.8)


def test_recalibration_discarded_when_it_hurts(digits_run, tmp_path, monkeypatch):
    from sdprune import prune_run as pipeline

    def wreck_statistics(model, loader, images, device, generator, gates="open"):
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean += 50.0
        return images

    monkeypatch.setattr(pipeline, "recalibrate_batch_norm", wreck_statistics)
    out = tmp_path / "pruned"
    result = invoke(str(digits_run), "--out", str(out), "--keep-depth", "8", "--strategy", "last",
                    "--recalibration-images", "64")
    assert result.exit_code == 0, result.output

    report = json.loads((out / "prune_report.json").read_text())
    names = [row["stage"] for row in report["stages"]]
    assert names == ["unpruned", "blocks removed", "recalibrated (discarded)", "statistics restored"]
    assert report["recalibration_kept"] is False
    assert report["stages"][2]["test_accuracy"] < report["stages"][1]["test_accuracy"]
    assert report["stages"][-1]["test_accuracy"] == report["stages"][1]["test_accuracy"]
    evaluation = CliRunner().invoke(main, ["evaluate", str(out), "--json"])
    assert json.loads(evaluation.stdout)["accuracy"] == pytest.approx(report["stages"][-1]["test_accuracy"])
