"""Training-step benchmark: what skipping blocks saves compared with masking them.

Stochastic depth as torchvision and timm implement it computes every residual
branch and then multiplies it by a random 0 or 1/p (`torchvision.ops.stochastic_depth`),
so a dropped block still costs its full forward and backward. sdprune does not run
the branch of a closed gate at all. This module times, in one process and on the
same synthetic batch, these kinds of training step (forward, backward, optimizer step):

- `constant`: every branch runs (constant depth);
- `mask`: every branch runs and is masked with `torchvision.ops.stochastic_depth`;
- `skip`: sdprune's gates, drawn as training draws them;
- `shortcuts`: no branch runs at all, the floor that skipping can approach;
- `stage1` to `stage3`: only one stage's branches run, to measure what each stage costs.

Modes alternate step by step within each round, so a change in background load
affects all of them alike, and the ratios to constant depth are taken within each round.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import stochastic_depth

from sdprune.data import DataBundle
from sdprune.depth import SURVIVAL_RULES, draw_gates, gate_generator
from sdprune.errors import InvalidValueError
from sdprune.resnet import STAGE_WIDTHS, CifarResNet, build_model
from sdprune.train import backward_and_step, mixed_precision

MODES = ("constant", "mask", "skip", "shortcuts")
# Steps in which only one stage's branches run; they measure the stages' costs for the limit.
STAGE_MODES = tuple(f"stage{stage}" for stage in range(1, len(STAGE_WIDTHS) + 1))

# The optimizer of the training recipe (Huang et al. 2016), so the step costs what training's does.
LEARNING_RATE = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4


@dataclass(frozen=True)
class BenchmarkConfig:
    """Benchmark settings: the network, the synthetic batch, and the number of steps of each mode."""

    arch: str = "resnet110"
    batch_size: int = 64
    steps: int = 30
    rounds: int = 3
    warmup_steps: int = 2
    survival_rule: str = "linear"
    survival_last: float = 0.5
    seed: int = 0
    input_shape: tuple[int, int, int] = (3, 32, 32)
    num_classes: int = 10
    profile_repeats: int = 5

    def __post_init__(self) -> None:
        for name in ("batch_size", "steps", "rounds", "profile_repeats"):
            value = getattr(self, name)
            if value < 1:
                raise InvalidValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.warmup_steps < 0:
            raise InvalidValueError(f"--warmup-steps must be 0 or more, got {self.warmup_steps}")
        if self.survival_rule not in SURVIVAL_RULES:
            raise InvalidValueError(
                f"--survival-rule must be one of {', '.join(SURVIVAL_RULES)}, got {self.survival_rule!r}"
            )
        if not 0.0 < self.survival_last <= 1.0:
            raise InvalidValueError(f"--survival-last must be in (0, 1], got {self.survival_last}")


@dataclass
class BenchmarkResult:
    """Measured step times, their ratios to constant depth, and the limits of skipping.

    Times are in seconds. `round_seconds[mode]` contains the mean step time of each
    round, and `drawn_survival[round]` the share of that round's skip steps in which
    each block ran. The headline numbers are medians over rounds.
    """

    config: BenchmarkConfig
    device: str
    round_seconds: dict[str, list[float]]
    branch_seconds: list[float]
    survival: list[float]
    stages: list[int]
    drawn_survival: list[list[float]]
    data: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def seconds(self, mode: str) -> float:
        return statistics.median(self.round_seconds[mode])

    def round_ratios(self, mode: str) -> list[float]:
        """Return the mode's step time over constant depth's, per round."""
        return [own / constant for own, constant in zip(self.round_seconds[mode], self.round_seconds["constant"])]

    def round_stage_seconds(self, round_index: int) -> dict[int, float]:
        """Return the time each stage's branches take in a step of round `round_index`.

        A stage's time is the step in which only its branches run, less the
        shortcuts-only step, both measured in the network and in the same round.
        """
        floor = self.round_seconds["shortcuts"][round_index]
        return {stage: max(self.round_seconds[f"stage{stage}"][round_index] - floor, 0.0)
                for stage in sorted(set(self.stages))}

    def round_branch_weights(self, round_index: int) -> list[float]:
        """Return each block's share of the time of all branches in round `round_index`.

        The stage's share comes from the in-network stage steps, and the per-block
        profile divides it among the stage's blocks. The isolated profile alone gave
        resnet110's stage 1 48% of the branch time on a 2-core CPU, in-network steps 46%.
        """
        stage_seconds = self.round_stage_seconds(round_index)
        total = sum(stage_seconds.values())
        weights = []
        for position, stage in enumerate(self.stages):
            in_stage = [self.branch_seconds[other] for other, other_stage in enumerate(self.stages) if other_stage == stage]
            within = self.branch_seconds[position] / sum(in_stage) if sum(in_stage) > 0 else 1.0 / len(in_stage)
            stage_share = stage_seconds[stage] / total if total > 0 else 1.0 / len(stage_seconds)
            weights.append(stage_share * within)
        return weights

    @property
    def expected_fraction(self) -> float:
        """Mean survival probability: the fraction of a step that FLOPs predict skipping keeps."""
        return sum(self.survival) / len(self.survival)

    def time_fractions(self, round_survival: Sequence[Sequence[float]]) -> list[float]:
        """Return, per round, the predicted step time over constant depth's when block l runs with `round_survival[round][l]`.

        The time a step spends in all branches is constant depth's step minus the
        shortcuts-only step of the same round. `round_branch_weights` divides it
        among blocks, and each block's part counts with its survival probability.
        """
        fractions = []
        for round_index, survival in enumerate(round_survival):
            constant = self.round_seconds["constant"][round_index]
            floor = self.round_seconds["shortcuts"][round_index]
            weights = self.round_branch_weights(round_index)
            weighted = sum(weight * probability for weight, probability in zip(weights, survival))
            fractions.append((floor + (constant - floor) * weighted) / constant)
        return fractions

    @property
    def round_time_weighted_fractions(self) -> list[float]:
        return self.time_fractions([self.survival] * len(self.round_seconds["constant"]))

    @property
    def round_drawn_time_fractions(self) -> list[float]:
        """The time-weighted fraction of each round for the gates the skip mode drew in it."""
        return self.time_fractions(self.drawn_survival)

    @property
    def time_weighted_fraction(self) -> float:
        return statistics.median(self.round_time_weighted_fractions)

    @property
    def drawn_time_fraction(self) -> float:
        return statistics.median(self.round_drawn_time_fractions)

    def stage_time_shares(self) -> dict[str, float]:
        """Return each stage's share of a constant-depth step, and the shortcuts-only share.

        Computed from the median step time of each mode, so the shares add up to 1.
        """
        constant = self.seconds("constant")
        floor = self.seconds("shortcuts")
        stage_seconds = {stage: max(self.seconds(f"stage{stage}") - floor, 0.0) for stage in sorted(set(self.stages))}
        total = sum(stage_seconds.values())
        shares = {f"stage{stage}": (constant - floor) * seconds / total / constant if total > 0 else 0.0
                  for stage, seconds in stage_seconds.items()}
        shares["shortcuts_stem_head"] = floor / constant
        return shares

    def stage_sum_vs_constant(self) -> float:
        """Return the shortcuts-only step plus every stage's branch time, over constant depth's step.

        Near 1 when the stages' costs add up to the whole step, a check on the
        stage measurements the limit rests on.
        """
        sums = []
        for round_index, constant in enumerate(self.round_seconds["constant"]):
            floor = self.round_seconds["shortcuts"][round_index]
            sums.append((floor + sum(self.round_stage_seconds(round_index).values())) / constant)
        return statistics.median(sums)

    def to_dict(self) -> dict[str, Any]:
        skip_ratios = self.round_ratios("skip")
        mask_ratios = self.round_ratios("mask")
        skip_vs_constant = statistics.median(skip_ratios)
        document = {
            "arch": self.config.arch,
            "device": self.device,
            "batch_size": self.config.batch_size,
            "steps": self.config.steps,
            "rounds": self.config.rounds,
            "survival_rule": self.config.survival_rule,
            "survival_last": self.config.survival_last,
            "seed": self.config.seed,
            "step_seconds": {mode: self.seconds(mode) for mode in self.round_seconds},
            "images_per_second": {mode: self.config.batch_size / self.seconds(mode) for mode in self.round_seconds},
            "skip_vs_constant": skip_vs_constant,
            "mask_vs_constant": statistics.median(mask_ratios),
            "shortcuts_vs_constant": statistics.median(self.round_ratios("shortcuts")),
            "expected_fraction": self.expected_fraction,
            "time_weighted_fraction": self.time_weighted_fraction,
            "drawn_time_fraction": self.drawn_time_fraction,
            "skip_vs_time_weighted": skip_vs_constant / self.time_weighted_fraction,
            "round_ratios": {
                "skip_vs_constant": skip_ratios,
                "mask_vs_constant": mask_ratios,
                "time_weighted_fraction": self.round_time_weighted_fractions,
                "drawn_time_fraction": self.round_drawn_time_fractions,
                "skip_vs_drawn_time_fraction": [
                    ratio / drawn for ratio, drawn in zip(skip_ratios, self.round_drawn_time_fractions)
                ],
            },
            "round_step_seconds": self.round_seconds,
            "stage_time_shares": self.stage_time_shares(),
            "stage_sum_vs_constant": self.stage_sum_vs_constant(),
            "block_branch_seconds": self.branch_seconds,
        }
        if self.data is not None:
            document["data"] = self.data
        document.update(self.extra)
        return document


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def masked_forward(model: CifarResNet, inputs: torch.Tensor, survival: Sequence[float]) -> torch.Tensor:
    """Run every branch and mask its output, as torchvision and timm apply stochastic depth.

    Survivors are scaled by 1/p_l, torchvision's convention. Each branch's forward
    and backward run whether or not its gate is open, which is the cost measured here.
    """
    x = model.forward_stem(inputs)
    for block, probability in zip(model.blocks, survival):
        identity = block.shortcut(x)
        if block.branch is None:
            x = identity
            continue
        residual = stochastic_depth(block.branch(x), p=1.0 - probability, mode="batch", training=True)
        x = F.relu(identity + residual)
    return model.forward_head(x)


def shortcuts_forward(model: CifarResNet, inputs: torch.Tensor) -> torch.Tensor:
    """Run the network with no branch at all: the least any gate pattern can cost."""
    x = model.forward_stem(inputs)
    for block in model.blocks:
        x = block.shortcut(x)
    return model.forward_head(x)


def make_optimizer(parameters) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameters, lr=LEARNING_RATE, momentum=MOMENTUM,
                           weight_decay=WEIGHT_DECAY, nesterov=True)


class ModeStep:
    """One training step of one mode, on its own copy of the network and optimizer.

    Each mode trains its own copy so that no mode's updates change what another
    mode computes; all copies start from the same weights.
    """

    def __init__(self, mode: str, model: CifarResNet, inputs: torch.Tensor, targets: torch.Tensor,
                 config: BenchmarkConfig, device: torch.device) -> None:
        self.mode = mode
        self.model = copy.deepcopy(model).train()
        self.optimizer = make_optimizer(self.model.parameters())
        self.inputs = inputs
        self.targets = targets
        self.config = config
        self.survival_tensor = self.model.survival
        self.survival = self.model.survival.tolist()
        self.autocast, self.scaler = mixed_precision(device)
        # Gate patterns drawn by the skip mode, so the prediction can use the same draws.
        self.drawn_gates: list[list[bool]] = []

    def forward(self, step: int) -> torch.Tensor:
        if self.mode == "constant":
            return self.model(self.inputs, gates=[True] * len(self.model.blocks))
        if self.mode == "mask":
            return masked_forward(self.model, self.inputs, self.survival)
        if self.mode == "skip":
            gates = draw_gates(self.survival_tensor, gate_generator(self.config.seed, step))
            self.drawn_gates.append(gates)
            return self.model(self.inputs, gates=gates)
        if self.mode in STAGE_MODES:
            stage = STAGE_MODES.index(self.mode) + 1
            return self.model(self.inputs, gates=[spec.stage == stage for spec in self.model.specs])
        return shortcuts_forward(self.model, self.inputs)

    def __call__(self, step: int) -> None:
        with self.autocast:
            logits = self.forward(step)
            loss = F.cross_entropy(logits.float(), self.targets)
        backward_and_step(loss, self.optimizer, self.scaler)


def time_call(function: Callable[[], Any], device: torch.device) -> float:
    """Return the wall time of `function()` in seconds, waiting for queued GPU work."""
    synchronize(device)
    started = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - started


class BlockProbe:
    """One block fed the activation it receives in the network, ready to time with and without its branch."""

    def __init__(self, block: nn.Module, block_input: torch.Tensor, device: torch.device) -> None:
        self.block = block
        self.device = device
        self.input = block_input.detach().requires_grad_(True)
        self.optimizer = make_optimizer(block.branch.parameters())
        self.autocast, _ = mixed_precision(device)
        with torch.no_grad(), self.autocast:
            self.output_gradient = torch.randn_like(block(self.input))

    def run_block(self) -> None:
        """Run the whole block's forward and backward, and the optimizer step on its branch."""
        with self.autocast:
            output = F.relu(self.block.shortcut(self.input) + self.block.branch(self.input))
        output.backward(self.output_gradient)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.input.grad = None

    def run_shortcut(self) -> None:
        """Run the shortcut's forward and backward, which a skipped block still costs."""
        with self.autocast:
            output = self.block.shortcut(self.input)
        output.backward(self.output_gradient)
        self.input.grad = None


def measure_branch_seconds(model: CifarResNet, inputs: torch.Tensor, repeats: int,
                           device: torch.device) -> list[float]:
    """Time each block's branch in isolation: forward, backward and its optimizer step.

    Each block runs on the activation it receives in the network. Its branch time is
    the median time of the whole block minus the median time of its shortcut alone,
    so it is the time a closed gate can save. Returns 0 for a pruned block. Every
    repeat visits all blocks in turn, so a change in background load spreads over
    all of them instead of skewing a few.
    """
    model = copy.deepcopy(model).train()
    autocast, _ = mixed_precision(device)
    with torch.no_grad(), autocast:
        x = model.forward_stem(inputs)
        block_inputs = []
        for block in model.blocks:
            block_inputs.append(x)
            x = block(x)

    probes = {position: BlockProbe(block, block_inputs[position], device)
              for position, block in enumerate(model.blocks) if block.branch is not None}
    for probe in probes.values():
        probe.run_block()
        probe.run_shortcut()

    whole: dict[int, list[float]] = {position: [] for position in probes}
    shortcut: dict[int, list[float]] = {position: [] for position in probes}
    for _ in range(repeats):
        for position, probe in probes.items():
            whole[position].append(time_call(probe.run_block, device))
            shortcut[position].append(time_call(probe.run_shortcut, device))

    seconds = []
    for position in range(len(model.blocks)):
        if position not in probes:
            seconds.append(0.0)
            continue
        seconds.append(max(statistics.median(whole[position]) - statistics.median(shortcut[position]), 0.0))
    return seconds


def run_rounds(steps: dict[str, ModeStep], config: BenchmarkConfig, device: torch.device,
               on_round: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, list[float]]:
    """Run `config.rounds` rounds of `config.steps` steps per mode; return each round's mean step time.

    Modes alternate step by step, and their order rotates at every step, so a
    change in background load that lasts a few steps reaches every mode alike.
    Warm-up steps run first and are not timed.
    """
    warmup_base = config.rounds * config.steps
    for mode_step in steps.values():
        for index in range(config.warmup_steps):
            mode_step(warmup_base + index)
        mode_step.drawn_gates.clear()

    round_seconds: dict[str, list[float]] = {mode: [] for mode in steps}
    modes = list(steps)
    for round_index in range(config.rounds):
        totals = {mode: 0.0 for mode in modes}
        for index in range(config.steps):
            step = round_index * config.steps + index
            shift = step % len(modes)
            for mode in modes[shift:] + modes[:shift]:
                totals[mode] += time_call(lambda: steps[mode](step), device)

        this_round = {mode: total / config.steps for mode, total in totals.items()}
        for mode, seconds in this_round.items():
            round_seconds[mode].append(seconds)
        if on_round is not None:
            on_round(round_index, this_round)
    return round_seconds


def measure_data_pipeline(bundle: DataBundle, batches: int, pin_memory: bool) -> dict[str, Any]:
    """Time the training loader (decoding and augmentation included) over up to `batches` batches.

    The first batch is not timed, because it includes starting the worker processes.
    """
    loader = bundle.loader("train", shuffle=True, generator=torch.Generator().manual_seed(0),
                           pin_memory=pin_memory)
    if len(loader) < 2:
        raise InvalidValueError(
            f"the training split has {len(bundle.train)} images, too few to time the loader at batch size "
            f"{bundle.config.batch_size}: use more images or a smaller --batch-size"
        )
    iterator = iter(loader)
    next(iterator)
    images = timed_batches = 0
    started = time.perf_counter()
    for inputs, _ in iterator:
        images += inputs.shape[0]
        timed_batches += 1
        if timed_batches >= batches:
            break
    seconds = time.perf_counter() - started
    return {
        "dataset": bundle.config.dataset,
        "workers": loader.num_workers,
        "batches": timed_batches,
        "images_per_second": images / seconds,
    }


def run_benchmark(config: BenchmarkConfig, device: torch.device,
                  on_round: Callable[[int, dict[str, float]], None] | None = None,
                  bundle: DataBundle | None = None, data_batches: int = 20) -> BenchmarkResult:
    """Time every mode of `MODES` and `STAGE_MODES` on one synthetic batch, and profile each block.

    With a `bundle`, also time its training loader, so a caller can compare how
    fast images arrive with how fast the model trains on them.
    """
    torch.manual_seed(config.seed)
    model = build_model(config.arch, config.num_classes, config.input_shape[0],
                        config.survival_rule, config.survival_last).to(device)
    generator = torch.Generator().manual_seed(config.seed)
    inputs = torch.randn(config.batch_size, *config.input_shape, generator=generator).to(device)
    targets = torch.randint(config.num_classes, (config.batch_size,), generator=generator).to(device)
    if device.type == "cuda":
        # The same fast path as training on CUDA, so the ratios are the ones training gets.
        torch.backends.cudnn.benchmark = True
        model = model.to(memory_format=torch.channels_last)
        inputs = inputs.contiguous(memory_format=torch.channels_last)

    branch_seconds = measure_branch_seconds(model, inputs, config.profile_repeats, device)
    steps = {mode: ModeStep(mode, model, inputs, targets, config, device) for mode in MODES + STAGE_MODES}
    round_seconds = run_rounds(steps, config, device, on_round)

    # The share of steps in which each block ran, per round.
    drawn = steps["skip"].drawn_gates
    drawn_survival = []
    for round_index in range(config.rounds):
        gates_of_round = drawn[round_index * config.steps:(round_index + 1) * config.steps]
        drawn_survival.append([sum(gates[position] for gates in gates_of_round) / config.steps
                               for position in range(len(model.blocks))])
    data = None
    if bundle is not None:
        data = measure_data_pipeline(bundle, data_batches, pin_memory=device.type == "cuda")
        data["train_images_per_second"] = config.batch_size / statistics.median(round_seconds["skip"])
        data["loading_is_bottleneck"] = data["images_per_second"] < data["train_images_per_second"]
    return BenchmarkResult(
        config=config,
        device=str(device),
        round_seconds=round_seconds,
        branch_seconds=branch_seconds,
        survival=model.survival.tolist(),
        stages=[spec.stage for spec in model.specs],
        drawn_survival=drawn_survival,
        data=data,
    )
