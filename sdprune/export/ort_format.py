"""Write the ORT format (.ort) that ONNX Runtime Mobile loads.

onnxruntime's convert_onnx_models_to_ort script always applies at least basic
graph optimizations, and their constant folding expands packed binary kernels
back to float32 before saving. Saving from a session with every optimization
disabled keeps the graph as exported, and the runtime still folds the unpacking
subgraph when it loads the .ort file.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime

from sdprune import atomic


def save_ort_format(onnx_path: str | Path, ort_path: str | Path) -> None:
    """Convert the model at `onnx_path` to the ORT format, written atomically to `ort_path`."""
    ort_path = Path(ort_path)
    with atomic.temporary_path(ort_path) as temporary:
        # onnxruntime picks the output format from the file name's extension.
        target = temporary.with_name(temporary.name + ".ort")
        try:
            options = onnxruntime.SessionOptions()
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
            options.optimized_model_filepath = str(target)
            options.add_session_config_entry("session.save_model_format", "ORT")
            onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
            target.replace(temporary)
        finally:
            target.unlink(missing_ok=True)
