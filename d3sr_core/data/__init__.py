"""Training data: the Real-ESRGAN degradation and image-folder datasets."""

from .datasets import (
    DataError,
    HRFolderDataset,
    PairedFolderDataset,
    StreamSampler,
    list_images,
    match_pairs,
)
from .degradation import (
    STAGES,
    DegradationConfig,
    DegradationParams,
    degrade,
    degrade_batch,
    sample_params,
)

__all__ = [
    "STAGES",
    "DataError",
    "DegradationConfig",
    "DegradationParams",
    "HRFolderDataset",
    "PairedFolderDataset",
    "StreamSampler",
    "degrade",
    "degrade_batch",
    "list_images",
    "match_pairs",
    "sample_params",
]
