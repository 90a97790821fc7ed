"""Binary-weight layers: exact +-alpha kernels, the straight-through gradient, storage in run folders."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from torch import nn

from sdprune import runs
from sdprune.binarize import (
    ALPHA_KEY,
    LATENT_KEY,
    SIGNS_KEY,
    BinaryWeight,
    binarize_layers,
    binarize_model,
    binary_layer_names,
    binary_scale,
    is_binary,
    latent_weight,
    model_size_bytes,
    pack_signs,
    unpack_signs,
)
from sdprune.cli import main
from sdprune.data import DataConfig
from sdprune.errors import RunFolderError
from sdprune.resnet import build_model
from sdprune.train import TrainConfig, Trainer

RUN_CONFIG = {"classes": [str(digit) for digit in range(10)], "mean": [0.5], "std": [0.25], "input_shape": [1, 8, 8]}
BRANCH_CONVS_RESNET20 = 18


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run these tiny models on one thread: on a busy machine, thread contention costs more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int = 0, kept_blocks: list[int] | None = None) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("resnet20", num_classes=10, in_channels=1, kept_blocks=kept_blocks)


def trained_looking(model: nn.Module) -> nn.Module:
    """Give batch norms non-trivial running statistics, so eval outputs depend on them."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, 8, 8))
    return model.eval()


def save_binary_run(folder, include_first_and_last: bool = False) -> tuple[nn.Module, torch.Tensor]:
    model = trained_looking(tiny_model())
    binarize_model(model, include_first_and_last)
    images = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        outputs = model(images)
    runs.save_run(folder, model, RUN_CONFIG)
    return images, outputs


def test_default_binarizes_branch_convolutions_only():
    model = tiny_model()
    names = binarize_model(model)
    assert len(names) == BRANCH_CONVS_RESNET20
    assert all(name.startswith("blocks.") and ".branch." in name for name in names)
    assert not is_binary(model.stem[0])
    assert not is_binary(model.classifier)
    assert binary_layer_names(model) == names


def test_include_first_and_last_adds_stem_and_classifier():
    model = tiny_model()
    names = binarize_model(model, include_first_and_last=True)
    assert names[0] == "stem.0"
    assert names[-1] == "classifier"
    assert len(names) == BRANCH_CONVS_RESNET20 + 2


def test_pruned_blocks_are_skipped():
    model = tiny_model(kept_blocks=[1, 4, 9])
    names = binarize_model(model)
    assert names == [f"blocks.{position}.branch.{layer}" for position in (0, 3, 8) for layer in (0, 3)]


def test_binarize_twice_adds_nothing():
    model = tiny_model()
    binarize_model(model)
    binarize_model(model)
    assert len(model.blocks[0].branch[0].parametrizations["weight"]) == 1


def test_binarize_layers_rejects_unknown_and_batch_norm():
    model = tiny_model()
    with pytest.raises(ValueError, match="no layer named 'blocks.0.branch.9'"):
        binarize_layers(model, ["blocks.0.branch.9"])
    with pytest.raises(ValueError, match="BatchNorm2d, not a Conv2d or Linear"):
        binarize_layers(model, ["blocks.0.branch.1"])


def test_kernel_holds_exactly_plus_minus_alpha():
    model = tiny_model()
    binarize_model(model, include_first_and_last=True)
    for name in binary_layer_names(model):
        module = model.get_submodule(name)
        latent = latent_weight(module).detach()
        weight = module.weight.detach()
        channels = weight.shape[0]
        alpha = latent.abs().reshape(channels, -1).double().mean(dim=1).float()
        expected_shape = [channels] + [1] * (weight.dim() - 1)

        assert torch.equal(weight.abs(), alpha.reshape(expected_shape).expand_as(weight)), name
        assert torch.equal(weight >= 0, latent >= 0), name
        assert torch.allclose(alpha, latent.abs().reshape(channels, -1).mean(dim=1)), name


def test_zero_maps_to_plus_alpha():
    layer = nn.Conv2d(1, 2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[[[0.0, -0.0], [0.5, -0.5]]], [[[0.0, 0.0], [0.0, 0.0]]]]))
    binarize_layers(layer, [""])
    weight = layer.weight.detach()
    assert weight[0].flatten().tolist() == [0.25, 0.25, 0.25, -0.25]
    assert torch.equal(weight[1], torch.zeros(1, 2, 2))


def test_binarizing_a_binary_kernel_changes_nothing():
    latent = torch.randn(16, 8, 3, 3)
    binary = BinaryWeight()(latent)
    assert torch.equal(BinaryWeight()(binary), binary)
    assert torch.equal(binary_scale(binary), binary_scale(latent))


def test_ste_gradient_matches_formula():
    latent = (torch.randn(4, 3, 3, 3) * 0.8).requires_grad_()
    upstream = torch.randn(4, 3, 3, 3)
    BinaryWeight()(latent).backward(upstream)

    weight = latent.detach()
    signs = torch.where(weight >= 0, 1.0, -1.0)
    alpha = weight.abs().mean(dim=(1, 2, 3), keepdim=True)
    through_sign = alpha * upstream * (weight.abs() <= 1)
    through_alpha = signs * (upstream * signs).mean(dim=(1, 2, 3), keepdim=True)
    assert (weight.abs() > 1).any()
    torch.testing.assert_close(latent.grad, through_sign + through_alpha)


def test_ste_sign_path_is_zero_beyond_clip():
    # An upstream gradient with zero projection on sign(W) per channel leaves only the sign path.
    weight = torch.tensor([[0.5, -1.5, 2.0, -0.25]])
    latent = weight.clone().requires_grad_()
    signs = torch.where(weight >= 0, 1.0, -1.0)
    upstream = signs * torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    BinaryWeight()(latent).backward(upstream)

    alpha = weight.abs().mean()
    assert latent.grad[0, 1] == 0
    assert latent.grad[0, 2] == 0
    assert latent.grad[0, 0] == alpha * upstream[0, 0]
    assert latent.grad[0, 3] == alpha * upstream[0, 3]


def test_gradient_reaches_latent_weights_in_model():
    model = tiny_model()
    binarize_model(model)
    model.train()
    loss = model(torch.randn(8, 1, 8, 8), gates=[True] * 9).logsumexp(dim=1).mean()
    loss.backward()
    for name in binary_layer_names(model):
        gradient = latent_weight(model.get_submodule(name)).grad
        assert gradient is not None and gradient.abs().sum() > 0, name


def test_pack_unpack_round_trip_odd_row_length():
    latent = torch.randn(3, 1, 3, 3)
    latent[0, 0, 0, 0] = 0.0
    bits, alpha = pack_signs(latent)
    assert bits.dtype == torch.uint8
    assert list(bits.shape) == [3, 2]
    assert list(alpha.shape) == [3]
    assert torch.equal(unpack_signs(bits, alpha, latent.shape), BinaryWeight()(latent))


def test_unpack_rejects_wrong_shapes():
    bits, alpha = pack_signs(torch.randn(3, 1, 3, 3))
    with pytest.raises(ValueError, match="uint8 of shape"):
        unpack_signs(bits[:, :1], alpha, (3, 1, 3, 3))
    with pytest.raises(ValueError, match="uint8 of shape"):
        unpack_signs(bits.to(torch.int32), alpha, (3, 1, 3, 3))
    with pytest.raises(ValueError, match="alpha must be floating point of shape"):
        unpack_signs(bits, alpha[:2], (3, 1, 3, 3))
    with pytest.raises(ValueError, match="negative, infinite or NaN"):
        unpack_signs(bits, -alpha, (3, 1, 3, 3))


def test_model_size_counts_one_bit_per_binary_weight():
    model = tiny_model()
    float_size = model_size_bytes(model)
    assert float_size["packed_bytes"] == float_size["float32_bytes"] == 4 * float_size["parameters"]

    binarize_model(model)
    size = model_size_bytes(model)
    first = next(layer for layer in size["layers"] if layer["name"] == "blocks.0.branch.0")
    # 16 output channels of 16 x 3 x 3 signs: 18 bytes of bits and 4 bytes of alpha each.
    assert first == {"name": "blocks.0.branch.0", "type": "Conv2d", "binary": True, "weights": 2304,
                     "bytes": 16 * (18 + 4)}
    saved = sum(4 * layer["weights"] - layer["bytes"] for layer in size["layers"] if layer["binary"])
    assert size["packed_bytes"] == size["float32_bytes"] - saved
    assert size["binary_parameters"] == sum(layer["weights"] for layer in size["layers"] if layer["binary"])


@pytest.mark.parametrize("include_first_and_last", [False, True])
def test_saved_run_reproduces_outputs_exactly(tmp_path, include_first_and_last):
    images, outputs = save_binary_run(tmp_path, include_first_and_last)
    run = runs.load_run(tmp_path)
    with torch.no_grad():
        assert torch.equal(run.model(images), outputs)
    assert run.config["binary_layers"] == binary_layer_names(run.model)


def test_saved_run_stores_bits_not_floats(tmp_path):
    save_binary_run(tmp_path)
    tensors = load_file(str(tmp_path / runs.WEIGHTS_FILE))
    assert not any(LATENT_KEY in key for key in tensors)
    assert tensors[f"blocks.0.branch.0.{SIGNS_KEY}"].dtype == torch.uint8
    assert list(tensors[f"blocks.0.branch.0.{SIGNS_KEY}"].shape) == [16, 18]
    assert list(tensors[f"blocks.0.branch.0.{ALPHA_KEY}"].shape) == [16]
    assert "stem.0.weight" in tensors


def test_loaded_weight_is_the_binary_kernel(tmp_path):
    save_binary_run(tmp_path)
    model = runs.load_run(tmp_path).model
    weight = model.blocks[4].branch[3].weight.detach()
    assert torch.equal(weight.abs(), weight.abs().amax(dim=(1, 2, 3), keepdim=True).expand_as(weight))


def test_float_run_keeps_its_keys(tmp_path):
    model = trained_looking(tiny_model())
    images = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        outputs = model(images)
    runs.save_run(tmp_path, model, RUN_CONFIG)

    assert set(load_file(str(tmp_path / runs.WEIGHTS_FILE))) == set(model.state_dict())
    run = runs.load_run(tmp_path)
    assert binary_layer_names(run.model) == []
    with torch.no_grad():
        assert torch.equal(run.model(images), outputs)


def test_run_without_binary_key_loads_as_float(tmp_path):
    runs.save_run(tmp_path, tiny_model(), RUN_CONFIG)
    config_path = tmp_path / runs.CONFIG_FILE
    document = json.loads(config_path.read_text())
    del document["binary_layers"]
    config_path.write_text(json.dumps(document))
    assert binary_layer_names(runs.load_run(tmp_path).model) == []


def rewrite_weights(folder, change) -> None:
    path = folder / runs.WEIGHTS_FILE
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def rewrite_config(folder, change) -> None:
    path = folder / runs.CONFIG_FILE
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


CORRUPTIONS = {
    "negative alpha": (
        lambda folder: rewrite_weights(folder, lambda t: t.update({f"blocks.0.branch.0.{ALPHA_KEY}": -torch.ones(16)})),
        "negative, infinite or NaN",
    ),
    "short sign bits": (
        lambda folder: rewrite_weights(
            folder, lambda t: t.update({f"blocks.0.branch.0.{SIGNS_KEY}": torch.zeros(16, 17, dtype=torch.uint8)})
        ),
        "uint8 of shape",
    ),
    "missing alpha": (
        lambda folder: rewrite_weights(folder, lambda t: t.pop(f"blocks.2.branch.3.{ALPHA_KEY}")),
        "has no blocks.2.branch.3.weight_alpha",
    ),
    "float weight in binary slot": (
        lambda folder: rewrite_weights(folder, lambda t: (
            t.pop(f"blocks.0.branch.0.{SIGNS_KEY}"), t.pop(f"blocks.0.branch.0.{ALPHA_KEY}"),
            t.update({"blocks.0.branch.0.weight": torch.zeros(16, 16, 3, 3)}),
        )),
        "has no blocks.0.branch.0.weight_sign_bits",
    ),
    "bits for a float layer": (
        lambda folder: rewrite_config(folder, lambda d: d.update({"binary_layers": d["binary_layers"][1:]})),
        r"missing \[.blocks.0.branch.0.weight.\]",
    ),
    "unknown layer": (
        lambda folder: rewrite_config(folder, lambda d: d["binary_layers"].append("blocks.0.branch.7")),
        "no layer named 'blocks.0.branch.7'",
    ),
    "batch norm listed": (
        lambda folder: rewrite_config(folder, lambda d: d["binary_layers"].append("blocks.0.branch.1")),
        "not a Conv2d or Linear",
    ),
    "not a list": (
        lambda folder: rewrite_config(folder, lambda d: d.update({"binary_layers": "blocks.0.branch.0"})),
        "must be a list of layer names",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_binary_entries_raise_run_folder_error(tmp_path, case):
    save_binary_run(tmp_path)
    corrupt, message = CORRUPTIONS[case]
    corrupt(tmp_path)
    with pytest.raises(RunFolderError, match=message):
        runs.load_run(tmp_path)


def test_info_reports_corrupt_binary_run_in_one_line(tmp_path):
    save_binary_run(tmp_path)
    CORRUPTIONS["negative alpha"][0](tmp_path)
    result = CliRunner().invoke(main, ["info", str(tmp_path)])
    assert result.exit_code == 1
    assert "contains invalid binary weights" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_info_lists_binary_layers_and_sizes(tmp_path):
    save_binary_run(tmp_path)
    result = CliRunner().invoke(main, ["info", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "(18 of 20 layers binary)" in result.output
    assert "blocks.0.branch.0      Conv2d      2304 binary" in result.output
    assert "stem.0                 Conv2d       144 float" in result.output

    result = CliRunner().invoke(main, ["info", "--json", str(tmp_path)])
    size = json.loads(result.output)["size"]
    assert size["packed_bytes"] < size["float32_bytes"]
    assert sum(layer["binary"] for layer in size["layers"]) == BRANCH_CONVS_RESNET20


def make_trainer(folder, model) -> Trainer:
    config = TrainConfig(epochs=1, lr=0.05, survival_rule="none", seed=3)
    data_config = DataConfig(limit_train=64, limit_test=32, batch_size=32)
    return Trainer(config, data_config, folder, torch.device("cpu"), quiet=True, model=model)


def test_trainer_updates_latent_and_keeps_kernels_binary(tmp_path):
    model = tiny_model()
    binarize_model(model)
    layer = model.blocks[0].branch[0]
    latent_before = latent_weight(layer).detach().clone()

    trainer = make_trainer(tmp_path, model)
    trainer.fit()

    latent_after = latent_weight(layer).detach()
    weight = layer.weight.detach()
    assert not torch.equal(latent_after, latent_before)
    assert torch.equal(weight, BinaryWeight()(latent_after))
    assert torch.equal(weight.abs(), binary_scale(latent_after).expand_as(weight))


def test_trainer_state_keeps_latent_and_restores_it(tmp_path):
    model = tiny_model()
    binarize_model(model)
    make_trainer(tmp_path, model).fit()

    state = runs.load_training_state(tmp_path)
    assert f"blocks.0.branch.0.{LATENT_KEY}" in state["model"]
    assert torch.equal(state["model"][f"blocks.0.branch.0.{LATENT_KEY}"], latent_weight(model.blocks[0].branch[0]))

    fresh = tiny_model(seed=7)
    binarize_model(fresh)
    resumed = make_trainer(tmp_path, fresh)
    resumed.restore()
    assert resumed.start_epoch == 1
    for name in binary_layer_names(model):
        assert torch.equal(latent_weight(fresh.get_submodule(name)), latent_weight(model.get_submodule(name))), name

    # The saved run itself rebuilds the same binary model.
    run = runs.load_run(tmp_path)
    images = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(run.model(images), model.eval()(images))


def test_size_of_binary_kernel_bytes_formula():
    # A 3x3 kernel over 5 input channels: 45 signs fill 6 bytes per output channel.
    model = nn.Sequential(nn.Conv2d(5, 2, 3, bias=False))
    binarize_layers(model, ["0"])
    layer = model_size_bytes(model)["layers"][0]
    assert layer["bytes"] == 2 * (math.ceil(45 / 8) + 4)


@pytest.fixture(scope="module")
def digits_parent(tmp_path_factory):
    """Save an untrained resnet20 for digits as a run folder that reads small data subsets."""
    folder = tmp_path_factory.mktemp("binarize") / "parent"
    model = trained_looking(tiny_model())
    runs.save_run(folder, model, {
        **RUN_CONFIG,
        "arch": "resnet20",
        "data": {"dataset": "digits", "data_dir": None, "val_split": 0, "limit_train": 64, "limit_test": 100},
    })
    return folder


def prune(*arguments: str):
    return CliRunner().invoke(main, ["prune", *arguments, "--recalibration-images", "64", "--json"])


def test_prune_binarize_without_removing_blocks(digits_parent, tmp_path):
    out = tmp_path / "binary"
    result = prune(str(digits_parent), "--out", str(out), "--keep-depth", "9", "--strategy", "last", "--binarize")
    assert result.exit_code == 0, result.output

    report = json.loads((out / "prune_report.json").read_text())
    stages = [row["stage"] for row in report["stages"]]
    recalibration = ["recalibrated"] if report["recalibration_kept"] else ["recalibrated (discarded)", "statistics restored"]
    assert stages == ["unpruned", "blocks removed", *recalibration, "binarized", "binarized, recalibrated"]
    binarized = report["stages"][stages.index("binarized")]
    before = report["stages"][stages.index("binarized") - 1]
    assert binarized["packed_bytes"] < before["packed_bytes"]
    assert binarized["float32_bytes"] == before["float32_bytes"]
    assert sum(layer["binary"] for layer in report["size"]["layers"]) == BRANCH_CONVS_RESNET20

    run = runs.load_run(out)
    assert run.config["binary_layers"] == binary_layer_names(run.model)
    assert len(run.config["binary_layers"]) == BRANCH_CONVS_RESNET20
    evaluation = CliRunner().invoke(main, ["evaluate", str(out), "--json"])
    assert evaluation.exit_code == 0, evaluation.output
    assert json.loads(evaluation.stdout)["accuracy"] == report["stages"][-1]["test_accuracy"]


def test_prune_binarize_all_after_removal(digits_parent, tmp_path):
    out = tmp_path / "binary"
    result = prune(str(digits_parent), "--out", str(out), "--keep-depth", "5", "--strategy", "every-other",
                   "--binarize-all", "--no-recalibrate")
    assert result.exit_code == 0, result.output

    report = json.loads(result.stdout)
    assert [row["stage"] for row in report["stages"]] == ["unpruned", "blocks removed", "binarized"]
    names = runs.load_run(out).config["binary_layers"]
    assert names[0] == "stem.0"
    assert names[-1] == "classifier"
    assert len(names) == 2 * 5 + 2


def test_prune_binarized_parent_keeps_binary_layers(digits_parent, tmp_path):
    binary = tmp_path / "binary"
    assert prune(str(digits_parent), "--out", str(binary), "--keep-depth", "9", "--strategy", "last",
                 "--binarize", "--no-recalibrate").exit_code == 0

    out = tmp_path / "pruned"
    result = prune(str(binary), "--out", str(out), "--keep-depth", "7", "--strategy", "last", "--no-recalibrate")
    assert result.exit_code == 0, result.output

    parent = runs.load_run(binary).model
    pruned = runs.load_run(out).model
    assert len(binary_layer_names(pruned)) == 2 * 7
    images = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(pruned(images), parent(images, gates=[index <= 7 for index in range(1, 10)]))


def test_prune_binarize_finetune_resumes(digits_parent, tmp_path):
    out = tmp_path / "binary"
    result = prune(str(digits_parent), "--out", str(out), "--keep-depth", "9", "--strategy", "last",
                   "--binarize", "--finetune-epochs", "1", "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["stages"][-1]["stage"] == "fine-tuned"
    state = runs.load_training_state(out)
    assert f"blocks.0.branch.0.{LATENT_KEY}" in state["model"]

    # Ask for a second epoch, as if the first run had been interrupted after one.
    report["finetuning"]["train_config"]["epochs"] = 2
    report["finetuning"]["epochs_completed"] = 1
    (out / "prune_report.json").write_text(json.dumps(report))
    resumed = CliRunner().invoke(main, ["prune", "--resume", str(out), "--quiet", "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert [line["epoch"] for line in runs.read_metrics(out)] == [1, 2]

    run = runs.load_run(out)
    assert len(binary_layer_names(run.model)) == BRANCH_CONVS_RESNET20
    latent = runs.load_training_state(out)["model"][f"blocks.0.branch.0.{LATENT_KEY}"]
    assert torch.equal(run.model.blocks[0].branch[0].weight, BinaryWeight()(latent))
