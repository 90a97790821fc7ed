"""`sdprune benchmark train`: the time a training step saves by skipping blocks."""

from __future__ import annotations

import statistics

import click

from sdprune.benchmark import MODES, STAGE_MODES, BenchmarkConfig, BenchmarkResult, run_benchmark
from sdprune.cli.common import DATA_DIR_VARIABLE, Group, print_json
from sdprune.data import DATASETS, DataConfig, load_data
from sdprune.depth import SURVIVAL_RULES
from sdprune.errors import InvalidValueError
from sdprune.resnet import ARCHITECTURES
from sdprune.train import resolve_device

DESCRIPTIONS = {
    "constant": "every branch runs",
    "mask": "every branch runs, then torchvision stochastic_depth masks it",
    "skip": "sdprune: a closed gate's branch does not run",
    "shortcuts": "no branch runs (the floor)",
    **{mode: f"only {mode}'s branches run (for the limit)" for mode in STAGE_MODES},
}


@click.group(cls=Group)
def benchmark() -> None:
    """Measure how fast sdprune trains on this machine."""


def format_spread(values: list[float]) -> str:
    return f"{min(values):.3f}..{max(values):.3f}"


def format_result(result: BenchmarkResult) -> str:
    """Lay out the step times, ratios, limits and stage shares as a text table."""
    document = result.to_dict()
    config = result.config
    lines = [
        f"{config.arch}, batch {config.batch_size}, {config.steps} steps x {config.rounds} rounds per mode "
        f"on {result.device}, survival rule {config.survival_rule} (p_L {config.survival_last})",
        f"{'mode':<10} {'step ms':>9} {'images/s':>9} {'vs constant':>12} {'per round':>24}  what runs",
    ]
    for mode in MODES + STAGE_MODES:
        ratios = result.round_ratios(mode)
        per_round = " ".join(f"{ratio:.3f}" for ratio in ratios)
        if len(per_round) > 24:
            per_round = format_spread(ratios)
        lines.append(
            f"{mode:<10} {1000 * result.seconds(mode):9.1f} {document['images_per_second'][mode]:9.1f} "
            f"{statistics.median(ratios):12.3f} {per_round:>24}  {DESCRIPTIONS[mode]}"
        )

    time_fractions = document["round_ratios"]["time_weighted_fraction"]
    skip_ratios = document["round_ratios"]["skip_vs_constant"]
    lines += [
        "limit of skip vs constant:",
        f"  mean survival probability (what FLOPs predict)   expected_fraction      {result.expected_fraction:.3f}",
        f"  branch time on this device x survival            time_weighted_fraction {result.time_weighted_fraction:.3f}"
        f"  (rounds {format_spread(time_fractions)})",
        f"  the same for the gates each round drew           drawn_time_fraction    {result.drawn_time_fraction:.3f}"
        f"  (rounds {format_spread(document['round_ratios']['drawn_time_fraction'])})",
        f"skip_vs_constant {document['skip_vs_constant']:.3f} (rounds {format_spread(skip_ratios)}) is "
        f"{document['skip_vs_time_weighted']:.3f} x time_weighted_fraction; per round, skip over the drawn "
        f"gates' fraction: " + " ".join(f"{ratio:.3f}" for ratio in document["round_ratios"]["skip_vs_drawn_time_fraction"]),
    ]
    shares = document["stage_time_shares"]
    stage_text = ", ".join(f"{name} {share:.0%}" for name, share in shares.items() if name.startswith("stage"))
    lines.append(
        f"share of a constant-depth step: {stage_text}, shortcuts/stem/head {shares['shortcuts_stem_head']:.0%} "
        f"(stages measured alone add up to {document['stage_sum_vs_constant']:.3f} of the step)"
    )

    if result.data is not None:
        data = result.data
        verdict = "loading is the bottleneck" if data["loading_is_bottleneck"] else "loading keeps up"
        lines.append(
            f"data: {data['dataset']} loader with {data['workers']} workers delivers {data['images_per_second']:.0f} "
            f"images/s, skip mode trains {data['train_images_per_second']:.0f} images/s: {verdict}"
        )
    return "\n".join(lines)


@benchmark.command("train")
@click.option("--arch", type=click.Choice(list(ARCHITECTURES)), default="resnet110", show_default=True,
              help="CIFAR ResNet depth to time.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images in the synthetic batch.")
@click.option("--steps", type=click.IntRange(min=1), default=30, show_default=True,
              help="Timed training steps of each mode in each round.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Interleaved rounds; ratios are medians over rounds.")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=2, show_default=True,
              help="Untimed steps of each mode before the first round.")
@click.option("--survival-rule", type=click.Choice(SURVIVAL_RULES), default="linear", show_default=True,
              help="How survival probability falls with depth.")
@click.option("--survival-last", type=float, default=0.5, show_default=True,
              help="Survival probability p_L of the last block (linear) or of every block (uniform), in (0, 1].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the weights, the batch and the gates.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda or cuda:N.")
@click.option("--dataset", type=click.Choice(DATASETS), default=None,
              help="Also time this data set's training loader; the synthetic batch takes its image shape.")
@click.option("--data-dir", type=click.Path(file_okay=False), envvar=DATA_DIR_VARIABLE, default=None,
              help=f"Folder of --dataset (imagefolder: with train/ and test/ or val/). Default: ${DATA_DIR_VARIABLE}.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Data-loader worker processes. Default: 0 for digits, else up to 4.")
@click.option("--data-batches", type=click.IntRange(min=1), default=20, show_default=True,
              help="Loader batches to time with --dataset.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def train_benchmark(arch, batch_size, steps, rounds, warmup_steps, survival_rule, survival_last, seed, device,
                    dataset, data_dir, workers, data_batches, as_json) -> None:
    """Time training steps at constant depth, with masked stochastic depth, and with sdprune's skipping.

    Prints the median step time of each mode, its ratio to constant depth per round,
    and the limit of skipping two ways: the mean survival probability, and the
    branch time measured per block on this device weighted by survival probability.
    """
    device = resolve_device(device)
    bundle = None
    input_shape, num_classes = (3, 32, 32), 10
    if dataset is not None:
        bundle = load_data(DataConfig(dataset=dataset, data_dir=data_dir, batch_size=batch_size, workers=workers))
        input_shape, num_classes = tuple(bundle.input_shape), len(bundle.classes)
    elif data_dir is not None and click.get_current_context().get_parameter_source("data_dir").name == "COMMANDLINE":
        raise InvalidValueError(f"--data-dir {data_dir} is set without --dataset: add --dataset to name the data set in it")

    config = BenchmarkConfig(
        arch=arch, batch_size=batch_size, steps=steps, rounds=rounds, warmup_steps=warmup_steps,
        survival_rule=survival_rule, survival_last=survival_last, seed=seed,
        input_shape=input_shape, num_classes=num_classes,
    )

    def report_round(index: int, seconds: dict[str, float]) -> None:
        if not as_json:
            times = ", ".join(f"{mode} {1000 * seconds[mode]:.1f} ms" for mode in MODES + STAGE_MODES)
            click.echo(f"round {index + 1}/{rounds}: {times}", err=True)

    result = run_benchmark(config, device, on_round=report_round, bundle=bundle, data_batches=data_batches)
    if as_json:
        print_json(result.to_dict())
    else:
        click.echo(format_result(result))
