"""CIFAR ResNet structure, gating and the test-time rule."""

import pytest
import torch
import torch.nn.functional as F

from sdprune.errors import InvalidValueError
from sdprune.resnet import ARCHITECTURES, TransitionShortcut, build_model, count_macs, count_parameters


@pytest.mark.parametrize("arch, blocks", [(name, 3 * n) for name, n in ARCHITECTURES.items() if n < 100])
def test_depth_six_n_plus_two(arch, blocks):
    model = build_model(arch)
    convolutions = sum(1 for module in model.modules() if isinstance(module, torch.nn.Conv2d))
    assert len(model.blocks) == blocks
    assert convolutions + 1 == 6 * (blocks // 3) + 2


def test_resnet20_parameter_count():
    # He et al. 2016 report 0.27M parameters for ResNet-20 with the parameter-free shortcut.
    assert count_parameters(build_model("resnet20")) == 269_722


def test_transition_blocks_marked():
    model = build_model("resnet20")
    transitions = [spec.index for spec in model.specs if spec.transition]
    assert transitions == [4, 7]
    assert all(isinstance(model.blocks[index - 1].shortcut, TransitionShortcut) for index in transitions)


def test_transition_shortcut_pools_and_pads():
    shortcut = TransitionShortcut(2, 4, 2)
    x = torch.arange(2 * 2 * 4 * 4, dtype=torch.float).reshape(2, 2, 4, 4)
    out = shortcut(x)
    assert out.shape == (2, 4, 2, 2)
    assert torch.equal(out[:, :2], F.avg_pool2d(x, 2))
    assert torch.count_nonzero(out[:, 2:]) == 0


@pytest.mark.parametrize("shape, classes", [((1, 8, 8), 10), ((3, 32, 32), 100), ((3, 17, 23), 7), ((5, 12, 12), 3)])
def test_any_input_shape_and_class_count(shape, classes):
    model = build_model("resnet20", num_classes=classes, in_channels=shape[0])
    for mode in (model.train, model.eval):
        mode()
        assert model(torch.randn(2, *shape)).shape == (2, classes)


def test_closed_gate_runs_no_branch_work():
    model = build_model("resnet20", num_classes=10, in_channels=3).train()
    calls = []
    for block in model.blocks:
        block.branch.register_forward_hook(lambda module, inputs, output, index=block.spec.index: calls.append(index))
    gates = [True, False, True, False, False, True, False, True, False]

    model(torch.randn(4, 3, 16, 16), gates=gates).sum().backward()

    open_blocks = [index for index, gate in zip(range(1, 10), gates) if gate]
    assert calls == open_blocks
    for block, gate in zip(model.blocks, gates):
        gradients = [parameter.grad for parameter in block.branch.parameters()]
        if gate:
            assert all(gradient is not None for gradient in gradients)
        else:
            assert all(gradient is None for gradient in gradients)


def test_training_draws_gates_from_generator():
    model = build_model("resnet20", survival_rule="uniform", survival_last=0.5).train()
    calls = []
    for block in model.blocks:
        block.branch.register_forward_hook(lambda *args: calls.append(1))
    model.gate_generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        model(torch.randn(2, 3, 8, 8))
    # 180 blocks with p = 0.5: a fair gate runs about half, far from all or none.
    assert 60 < len(calls) < 120


def test_eval_scales_branch_by_survival_probability():
    model = build_model("resnet20", survival_last=0.5).eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        hidden = model.forward_stem(x)
        for block in model.blocks:
            hidden = F.relu(block.shortcut(hidden) + block.spec.survival_prob * block.branch(hidden))
        expected = model.forward_head(hidden)
        actual = model(x)
        unscaled = model(x, gates=[True] * 9, test_scaling=False)
    torch.testing.assert_close(actual, expected)
    assert not torch.allclose(actual, unscaled)


def test_pruned_block_has_no_parameters():
    full = build_model("resnet20")
    pruned = build_model("resnet20", kept_blocks=[1, 2, 3, 5, 6, 8, 9])
    assert pruned.blocks[3].branch is None
    assert not any(name.startswith("blocks.3.") for name in pruned.state_dict())
    assert count_parameters(pruned) < count_parameters(full)
    assert count_macs(pruned, (3, 32, 32)) < count_macs(full, (3, 32, 32))
    assert pruned(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_resnet20_macs():
    # About 41M multiply-accumulates per 32x32 image, the usual figure for ResNet-20.
    assert 40e6 < count_macs(build_model("resnet20"), (3, 32, 32)) < 42e6


def test_unknown_arch_rejected():
    with pytest.raises(InvalidValueError, match="unknown architecture 'resnet21'"):
        build_model("resnet21")


def test_unknown_kept_block_rejected():
    with pytest.raises(InvalidValueError, match=r"kept blocks \[12\]"):
        build_model("resnet20", kept_blocks=[1, 12])
