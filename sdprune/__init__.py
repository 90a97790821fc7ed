"""sdprune: stochastic-depth ResNets, block pruning and compact ONNX export.

Python API for people who train with their own loops:

    model = sdprune.build_model("resnet56", num_classes=10, survival_last=0.5)
    run = sdprune.load_run("models/r20")   # run.model, run.config
"""

__version__ = "0.1.0"

from sdprune.resnet import build_model  # noqa: E402
from sdprune.runs import load_run  # noqa: E402

__all__ = ["__version__", "build_model", "load_run"]
