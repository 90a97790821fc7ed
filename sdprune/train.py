"""The training loop: single process or DDP under torchrun, resumable per epoch.

The defaults follow the training recipe of Huang et al. 2016: SGD with Nesterov
momentum 0.9, weight decay 1e-4, learning rate 0.1 divided by 10 at 50% and 75%
of the epochs, batch size 128.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.data.distributed import DistributedSampler

from sdprune import atomic, distributed, runs
from sdprune.data import DataBundle, DataConfig, load_data
from sdprune.depth import draw_gates, gate_generator
from sdprune.errors import InvalidValueError, RunFolderError, TrainingDivergedError
from sdprune.evaluate import evaluate
from sdprune.progress import progress
from sdprune.resnet import CifarResNet, build_model

logger = logging.getLogger(__name__)

SCHEDULES = ("step", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """Model, optimizer and schedule settings of a training run."""

    arch: str = "resnet20"
    survival_rule: str = "linear"
    survival_last: float = 0.5
    epochs: int = 10
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = True
    schedule: str = "step"
    seed: int = 0
    sync_bn: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise InvalidValueError(f"--epochs must be at least 1, got {self.epochs}")
        if not self.lr > 0:
            raise InvalidValueError(f"--lr must be positive, got {self.lr}")
        if not 0.0 < self.survival_last <= 1.0:
            raise InvalidValueError(f"--survival-last must be in (0, 1], got {self.survival_last}")
        if self.schedule not in SCHEDULES:
            raise InvalidValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.weight_decay < 0:
            raise InvalidValueError(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        if not 0.0 <= self.momentum < 1.0:
            raise InvalidValueError(f"--momentum must be in [0, 1), got {self.momentum}")


@dataclass
class EpochMetrics:
    """One line of metrics.jsonl."""

    epoch: int
    lr: float
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    seconds: float
    mean_blocks_run: float
    val_loss: float | None = None
    val_accuracy: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values.update(values.pop("extra"))
        return {key: value for key, value in values.items() if value is not None}


def resolve_device(name: str) -> torch.device:
    """Turn `auto`, `cpu`, `cuda` or `cuda:N` into a device, checking it exists."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise InvalidValueError(f"--device {name!r} is not a device: use auto, cpu or cuda[:N]") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidValueError(f"--device {name} requested but CUDA is not available here: use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise InvalidValueError(f"--device {name!r} is not supported: use auto, cpu or cuda[:N]")
    return device


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """Return the learning rate of 0-based `epoch` under the configured schedule."""
    if config.schedule == "cosine":
        return 0.5 * config.lr * (1.0 + math.cos(math.pi * epoch / config.epochs))
    factor = 1.0
    if epoch >= 0.5 * config.epochs:
        factor *= 0.1
    if epoch >= 0.75 * config.epochs:
        factor *= 0.1
    return config.lr * factor


def default_run_folder(arch: str, dataset: str) -> Path:
    return Path("models") / f"{arch}-{dataset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def mixed_precision(device: torch.device) -> tuple[contextlib.AbstractContextManager, torch.amp.GradScaler | None]:
    """Return the autocast context and grad scaler for `device`.

    CUDA trains in bf16 where the GPU supports it, else in fp16 with a grad
    scaler against underflow; the CPU trains in fp32.
    """
    if device.type != "cuda":
        return contextlib.nullcontext(), None
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler | None) -> None:
    """Backpropagate `loss` and take one optimizer step, through the grad scaler when there is one.

    Gradients are reset to None, not zero, so a block whose gate was closed gets no
    update at all: SGD skips parameters without a gradient, weight decay and momentum included.
    """
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def run_config_document(model: CifarResNet, bundle: DataBundle, config: TrainConfig,
                        data_config: DataConfig, summary: dict[str, Any]) -> dict[str, Any]:
    """Return what model.json records beside the structure."""
    data_dir = str(Path(data_config.data_dir).expanduser().resolve()) if data_config.data_dir else None
    return {
        "arch": config.arch,
        "classes": bundle.classes,
        "input_shape": bundle.input_shape,
        "mean": bundle.mean,
        "std": bundle.std,
        "survival_rule": config.survival_rule,
        "survival_last": config.survival_last,
        "seed": config.seed,
        "data": {
            "dataset": data_config.dataset,
            "data_dir": data_dir,
            "val_split": data_config.val_split,
            "limit_train": data_config.limit_train,
            "limit_test": data_config.limit_test,
        },
        "parent": None,
        "training": summary,
    }


class Trainer:
    """Trains one model for the configured epochs, saving after every epoch.

    `on_epoch` receives each EpochMetrics on rank 0, for the caller to print.
    """

    def __init__(self, config: TrainConfig, data_config: DataConfig, out: Path, device: torch.device,
                 quiet: bool = False, on_epoch: Callable[[EpochMetrics], None] | None = None,
                 model: CifarResNet | None = None, run_document: dict[str, Any] | None = None) -> None:
        self.config = config
        self.data_config = data_config
        self.out = Path(out)
        self.device = device
        self.quiet = quiet
        self.on_epoch = on_epoch or (lambda metrics: None)
        if config.sync_bn and device.type != "cuda" and distributed.launched_by_torchrun():
            raise InvalidValueError("--sync-bn needs CUDA devices because PyTorch's SyncBatchNorm does not run "
                                    "on the CPU: drop --sync-bn or train on GPUs")
        self.context = distributed.initialize(device)
        if self.context.distributed and device.type == "cuda":
            self.device = device = torch.device("cuda", self.context.local_rank)
        if config.sync_bn and not self.context.distributed:
            logger.warning("--sync-bn has no effect in a single process; it applies under torchrun")

        torch.manual_seed(config.seed)
        self.bundle = load_data(data_config)
        if model is None:
            # Seeding again here makes the initial weights depend on arch and seed alone,
            # whatever random numbers loading the data consumed.
            torch.manual_seed(config.seed)
            model = build_model(config.arch, len(self.bundle.classes), self.bundle.input_shape[0],
                                config.survival_rule, config.survival_last)
        self.check_model_matches_data(model)
        model.arch = model.arch if getattr(model, "arch", None) else config.arch
        self.model = model.to(device)
        self.extra_document = run_document or {}

        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            self.model = self.model.to(memory_format=torch.channels_last)
        if config.sync_bn and self.context.distributed:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        if config.compile:
            # Compiling each branch, not the gated forward, keeps the per-step gate
            # decision in plain Python, so a skipped block still costs nothing.
            # Module.compile works in place, so state_dict keys keep their names.
            for block in self.model.blocks:
                if block.branch is not None:
                    block.branch.compile()
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=config.lr, momentum=config.momentum,
            weight_decay=config.weight_decay, nesterov=config.nesterov and config.momentum > 0,
        )
        self.autocast, self.scaler = mixed_precision(device)
        self.network: nn.Module = self.model
        if self.context.distributed:
            # Every rank draws the same gates, so the set of unused parameters is the
            # same on all ranks; DDP still needs to be told that some may be unused.
            self.network = DistributedDataParallel(
                self.model,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        self.start_epoch = 0
        self.shuffle_generator = torch.Generator()
        self.train_loader: DataLoader | None = None
        self.parameters_digest: bytes | None = None

    def check_model_matches_data(self, model: CifarResNet) -> None:
        if model.num_classes != len(self.bundle.classes):
            raise InvalidValueError(
                f"the model has {model.num_classes} classes but the data has {len(self.bundle.classes)}: "
                "use data with the model's classes"
            )
        if model.in_channels != self.bundle.input_shape[0]:
            raise InvalidValueError(
                f"the model takes {model.in_channels} input channels but the images have "
                f"{self.bundle.input_shape[0]}: use matching data"
            )

    def restore(self) -> None:
        """Continue from the training state in the output folder."""
        state = runs.load_training_state(self.out)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scaler is not None and "scaler" in state:
                self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError) as error:
            raise RunFolderError(f"{self.out / runs.STATE_FILE} does not match this model: {error}") from error
        self.start_epoch = int(state["epoch"])

        # A process killed while writing leaves its temporary file behind; the final files are intact.
        if self.context.is_main:
            for leftover in self.out.glob(".*.tmp"):
                leftover.unlink(missing_ok=True)

        # Drop metrics of an epoch that finished after the last saved state.
        if self.context.is_main:
            kept = [line for line in runs.read_metrics(self.out) if line["epoch"] <= self.start_epoch]
            atomic.write_text(self.out / runs.METRICS_FILE, "".join(json.dumps(line) + "\n" for line in kept))

    def training_loader(self) -> DataLoader:
        """Return the training loader, built on first use and kept, so persistent workers outlive an epoch."""
        if self.train_loader is None:
            if self.context.distributed:
                sampler = DistributedSampler(self.bundle.train, num_replicas=self.context.world_size,
                                             rank=self.context.rank, shuffle=True, seed=self.config.seed)
            else:
                sampler = RandomSampler(self.bundle.train, generator=self.shuffle_generator)
            self.train_loader = self.bundle.loader(
                "train", sampler=sampler, generator=torch.Generator().manual_seed(self.config.seed),
                pin_memory=self.device.type == "cuda",
            )
        return self.train_loader

    def train_epoch(self, epoch: int) -> tuple[float, float, float]:
        """Run one epoch; return mean loss, accuracy and mean blocks run per step."""
        self.network.train()
        loader = self.training_loader()
        # Seeding the shuffle per epoch makes a resumed run see the same order.
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        else:
            self.shuffle_generator.manual_seed(self.config.seed * 10_007 + epoch)
        steps = len(loader)
        survival = self.model.survival
        # A pruned block has no branch, so its gate does no work and is not counted as run.
        kept_blocks = [spec.kept for spec in self.model.specs]

        loss_sum = correct = images = blocks_run = 0.0
        batches = progress(loader, steps, f"epoch {epoch + 1}/{self.config.epochs}",
                           enabled=not self.quiet and self.context.is_main)
        for step, (inputs, targets) in enumerate(batches):
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                inputs = inputs.contiguous(memory_format=torch.channels_last)

            # One gate per block per mini-batch, drawn identically on every rank.
            gates = draw_gates(survival, gate_generator(self.config.seed, epoch * steps + step))
            with self.autocast:
                logits = self.network(inputs, gates=gates)
                loss = F.cross_entropy(logits.float(), targets)
            # NOTE: this check and the .item() calls below wait for the GPU at every step, so the
            # CPU cannot queue the next step early; what that costs on a fast GPU is not measured.
            if not torch.isfinite(loss):
                kept = f"epoch {epoch} is kept in {self.out}" if epoch else "no epoch had finished, so nothing was saved"
                raise TrainingDivergedError(
                    f"training loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                    f"{kept}: lower --lr and train again"
                )

            backward_and_step(loss, self.optimizer, self.scaler)

            loss_sum += loss.item() * targets.numel()
            correct += (logits.argmax(dim=1) == targets).sum().item()
            images += targets.numel()
            blocks_run += sum(gate for gate, kept in zip(gates, kept_blocks) if kept)

        loss_sum, correct, images = distributed.sum_across_ranks([loss_sum, correct, images], self.context, self.device)
        return loss_sum / max(images, 1), correct / max(images, 1), blocks_run / max(steps, 1)

    def save(self, epoch: int, metrics: list[EpochMetrics], seconds: float) -> None:
        """Write model files, the metrics line and then the training state (rank 0 only)."""
        if not self.context.is_main:
            return
        last = metrics[-1]
        summary = {
            "epochs": self.config.epochs,
            "epochs_completed": epoch,
            "finished": epoch >= self.config.epochs,
            "test_accuracy": last.test_accuracy,
            "test_loss": last.test_loss,
            "val_accuracy": last.val_accuracy,
            "seconds": seconds,
            "parameters_sha256": self.parameters_digest.hex() if self.parameters_digest else None,
            "world_size": self.context.world_size,
            "global_batch_size": self.data_config.batch_size * self.context.world_size,
            "config": asdict(self.config),
        }
        document = run_config_document(self.model, self.bundle, self.config, self.data_config, summary)
        document.update(self.extra_document)
        runs.save_run(self.out, self.model, document)
        atomic.append_line(self.out / runs.METRICS_FILE, json.dumps(last.to_dict()))
        state = {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "train_config": json.dumps(asdict(self.config)),
            "data_config": json.dumps(asdict(self.data_config)),
            "seconds": seconds,
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        runs.save_training_state(self.out, state)

    def fit(self) -> list[EpochMetrics]:
        """Train from `start_epoch` to the configured number of epochs."""
        history: list[EpochMetrics] = []
        total_seconds = 0.0
        pin_memory = self.device.type == "cuda"
        test_loader = self.bundle.loader("test", pin_memory=pin_memory)
        val_loader = self.bundle.loader("val", pin_memory=pin_memory) if self.bundle.val is not None else None
        for epoch in range(self.start_epoch, self.config.epochs):
            lr = learning_rate(self.config, epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr

            started = time.perf_counter()
            train_loss, train_accuracy, mean_blocks = self.train_epoch(epoch)
            seconds = time.perf_counter() - started
            total_seconds += seconds

            # Checked every epoch, so a run whose replicas drifted apart is never saved.
            self.parameters_digest = distributed.check_replicas_agree(self.model, self.context, self.device)
            test = evaluate(self.model, test_loader, self.device)
            val = evaluate(self.model, val_loader, self.device) if val_loader is not None else None
            metrics = EpochMetrics(
                epoch=epoch + 1, lr=lr, train_loss=train_loss, train_accuracy=train_accuracy,
                test_loss=test.loss, test_accuracy=test.accuracy, seconds=seconds,
                mean_blocks_run=mean_blocks,
                val_loss=val.loss if val else None, val_accuracy=val.accuracy if val else None,
            )
            history.append(metrics)
            self.save(epoch + 1, history, total_seconds)
            distributed.barrier(self.context)
            if self.context.is_main:
                self.on_epoch(metrics)
        return history
