"""The metadata_props an exported model carries, so an app and `sdprune validate` can use it alone.

Every value is stored as JSON text under a plain key. This module imports
neither torch nor onnx, so reading metadata needs only onnxruntime.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from sdprune.errors import SdpruneError

METADATA_FORMAT = "sdprune-export"
METADATA_VERSION = 1


class ExportFileError(SdpruneError):
    """An exported model file is missing, corrupt or lacks sdprune metadata."""


@dataclass(frozen=True)
class ExportMetadata:
    """Metadata an exported model carries beside its graph: preprocessing, classes, lineage, sizes.

    `input_shape` is (C, H, W). Inputs are normalized per channel as
    (x - mean) / std, where x is the pixel value scaled to [0, 1]. `precision` is fp32, fp32+binary (packed sign bits) or int8.
    `unpruned_fp32_bytes` is the size of the fp32 export of the unpruned network
    of the same architecture, and `fp32_bytes` that of this run exported in fp32.
    """

    classes: list[str]
    input_shape: list[int]
    mean: list[float]
    std: list[float]
    arch: str | None
    kept_blocks: list[int]
    removed_blocks: list[int]
    binary_layers: list[str]
    source_run: str
    parent_run: str | None
    dataset: str | None
    precision: str
    fp32_bytes: int
    unpruned_fp32_bytes: int
    input_name: str = "images"
    output_name: str = "logits"
    format: str = METADATA_FORMAT
    format_version: int = METADATA_VERSION

    def to_properties(self) -> dict[str, str]:
        """Return the metadata as metadata_props: plain keys, JSON-encoded values."""
        return {key: json.dumps(value) for key, value in asdict(self).items()}

    @classmethod
    def from_properties(cls, properties: dict[str, str], source: str) -> "ExportMetadata":
        """Read metadata written by `to_properties`; `source` names the file in errors."""
        if properties.get("format") != json.dumps(METADATA_FORMAT):
            raise ExportFileError(
                f"{source} has no sdprune export metadata: validate only files written by sdprune export onnx"
            )
        values: dict[str, Any] = {}
        try:
            for field in fields(cls):
                if field.name in properties:
                    values[field.name] = json.loads(properties[field.name])
            metadata = cls(**values)
        except (json.JSONDecodeError, TypeError) as error:
            raise ExportFileError(f"{source} has unreadable sdprune metadata ({error}): export it again") from error
        if metadata.format_version > METADATA_VERSION:
            raise ExportFileError(
                f"{source} was exported by a newer sdprune (metadata version {metadata.format_version}): upgrade sdprune"
            )
        return metadata
