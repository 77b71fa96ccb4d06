"""Data: dataset sources, invertible transforms and seeded sampling (see `calibjax.data.sources`)."""

from calibjax.data.sampling import batch_indices, class_balanced_indices, class_indices, split_per_class
from calibjax.data.sources import DATASETS, Dataset, DatasetSpec, load
from calibjax.data.transforms import ZCA, Normalize, apply_transforms, dataset_stats

__all__ = [
    "DATASETS", "Dataset", "DatasetSpec", "Normalize", "ZCA", "apply_transforms", "batch_indices",
    "class_balanced_indices", "class_indices", "dataset_stats", "load", "split_per_class",
]
