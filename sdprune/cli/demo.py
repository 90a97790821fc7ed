"""`sdprune demo`: the whole pipeline in one command, ending with one comparison table.

Each step runs the same command a user would type, so the demo exercises the
real command line and leaves ordinary run folders, reports and ONNX files behind.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import click

from sdprune.cli.common import check_writable, data_options
from sdprune.errors import InvalidValueError
from sdprune.resnet import ARCHITECTURES
from sdprune.validate import report_path


def data_arguments(options: dict) -> list[str]:
    """Turn the demo's data options back into command-line arguments for each step."""
    arguments = ["--dataset", options["dataset"] or "digits"]
    if options["data_dir"]:
        arguments += ["--data-dir", str(options["data_dir"])]
    for name in ("limit_train", "limit_test", "workers"):
        if options[name] is not None:
            arguments += [f"--{name.replace('_', '-')}", str(options[name])]
    return arguments + ["--batch-size", str(options["batch_size"])]


def run_step(title: str, arguments: list[str]) -> None:
    """Run one sdprune command in this process; its errors end the demo as they would alone."""
    from sdprune.cli import main

    click.echo(f"\n== {title}: sdprune {' '.join(arguments)}", err=True)
    main.main(args=arguments, prog_name="sdprune", standalone_mode=False)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def table_row(name: str, run: Path, onnx_path: Path) -> dict:
    """Collect one model's figures from its run folder and its validation report."""
    from sdprune.cli.info import describe
    from sdprune.runs import load_run

    summary = describe(load_run(run))
    validation = read_json(report_path(onnx_path))
    latency = validation["latency_ms"]["median"]
    return {
        "model": name,
        "accuracy": validation["accuracy"]["onnxruntime"],
        "pytorch_accuracy": validation["accuracy"]["pytorch"],
        "blocks": len(summary["kept_blocks"]),
        "params": summary["params"],
        "macs": summary["macs"],
        "onnx_bytes": validation["size"]["bytes"],
        "ratio_to_unpruned_fp32": validation["size"]["ratio_to_unpruned_fp32"],
        "latency_ms_batch_1": latency.get("batch_1"),
        "latency_ms_batch_64": latency.get("batch_64"),
        "file": str(onnx_path),
    }


def format_table(rows: list[dict]) -> str:
    header = (f"{'model':<24} {'accuracy':>8} {'blocks':>6} {'params':>9} {'MACs':>12} "
              f"{'ONNX bytes':>11} {'vs fp32':>7} {'ms b=1':>7} {'ms b=64':>8}")
    lines = [header, "-" * len(header)]
    for row in rows:
        ratio = row["ratio_to_unpruned_fp32"]
        lines.append(
            f"{row['model']:<24} {row['accuracy']:>8.2%} {row['blocks']:>6} {row['params']:>9,} {row['macs']:>12,} "
            f"{row['onnx_bytes']:>11,} {(f'{1 / ratio:.1f}x' if ratio else '-'):>7} "
            f"{row['latency_ms_batch_1']:>7.2f} {row['latency_ms_batch_64']:>8.2f}"
        )
    return "\n".join(lines)


@click.command()
@click.option("--arch", type=click.Choice(list(ARCHITECTURES)), default="resnet20", show_default=True,
              help="CIFAR ResNet to train.")
@click.option("--epochs", type=click.IntRange(min=1), default=20, show_default=True,
              help="Training epochs of the full network.")
@click.option("--keep-depth", type=click.IntRange(min=1), default=None,
              help="Blocks to keep when pruning. Default: half of the blocks, rounded up.")
@click.option("--finetune-epochs", type=click.IntRange(min=0), default=3, show_default=True,
              help="Fine-tuning epochs after pruning and again after binarizing.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda or cuda:N.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of training, analysis and pruning.")
@data_options()
@click.option("--val-split", type=click.IntRange(min=0), default=200, show_default=True,
              help="Training images held out to choose which blocks to remove (0 uses the test set).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for every output. Default: models/demo-<time>.")
@click.option("--json", "as_json", is_flag=True, help="Print the final table as JSON.")
def demo(arch, epochs, keep_depth, finetune_epochs, device, seed, out, as_json, **options) -> None:
    """Train, analyze, prune, binarize and export one model, then compare the results.

    Runs on the bundled digits data by default: offline, a few minutes on 2 CPU cores.
    """
    out = out or Path("models") / f"demo-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if (out / "full" / "model.json").exists():
        raise InvalidValueError(f"{out} already holds a demo: choose another --out")
    blocks = 3 * ARCHITECTURES[arch]
    keep_depth = keep_depth or (blocks + 1) // 2
    if keep_depth > blocks:
        raise InvalidValueError(f"--keep-depth must be between 1 and {blocks} ({arch} has {blocks} blocks), got {keep_depth}")

    check_writable(out)
    started = time.perf_counter()
    data = data_arguments(options)
    common = ["--device", device]
    full, analysis, pruned, binary, exports = (out / name for name in ("full", "analysis", "pruned", "pruned-binary", "onnx"))
    val_split = ["--val-split", str(options["val_split"])] if options["val_split"] else []

    # Train at stochastic depth, then measure which blocks matter on held-out images.
    run_step("train", ["train", "--arch", arch, "--epochs", str(epochs), "--seed", str(seed), *val_split,
                       *data, *common, "--out", str(full), "--quiet"])
    run_step("analyze", ["analyze", str(full), *data, *common, "--seed", str(seed), "--out", str(analysis), "--quiet"])

    # Remove the least important blocks; then binarize the smaller network's branches.
    run_step("prune", ["prune", str(full), "--keep-depth", str(keep_depth), "--importance",
                       str(analysis / "importance.json"), "--finetune-epochs", str(finetune_epochs),
                       *data, *common, "--out", str(pruned), "--quiet"])
    run_step("binarize", ["prune", str(pruned), "--keep-depth", str(keep_depth), "--binarize",
                          "--finetune-epochs", str(max(finetune_epochs, 1)), *data, *common,
                          "--out", str(binary), "--quiet"])

    # Export each model and validate it under onnxruntime.
    models = [
        ("full fp32", full, exports / "full.onnx", []),
        ("full int8", full, exports / "full-int8.onnx", ["--quantize", "int8"]),
        ("pruned fp32", pruned, exports / "pruned.onnx", []),
        ("pruned int8", pruned, exports / "pruned-int8.onnx", ["--quantize", "int8"]),
        ("pruned binary (1-bit)", binary, exports / "pruned-binary.onnx", []),
    ]
    for name, run, path, extra in models:
        run_step(f"export {name}", ["export", "onnx", str(run), "-o", str(path), *extra, *data, "--quiet"])

    rows = [table_row(name, run, path) for name, run, path, _ in models]
    if as_json:
        click.echo(json.dumps({"out": str(out), "seconds": time.perf_counter() - started, "models": rows}, indent=2))
        return
    click.echo(f"\nsdprune demo: {arch} on {options['dataset'] or 'digits'} in {time.perf_counter() - started:.0f} s, "
               f"outputs in {out}")
    click.echo(format_table(rows))
    click.echo("accuracy: onnxruntime on the test split; vs fp32: size reduction against the full fp32 ONNX file; "
               "ms: median latency on the CPU at batch 1 and 64")
