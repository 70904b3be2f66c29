"""The data layer: task sources (tfds, local npz / image folders, bundled demo
tasks) loaded into host arrays, and numpy preprocessing (DESIGN.md §3).

Importing this package loads neither TensorFlow, tensorflow_datasets nor
gRPC; tfds is imported only when a tfds source is loaded. What loading may
cost is bounded by DataLimits (evolve.data.limits). Task names follow the one
rule of evolve.types.validate_task_name.
"""

from evolve.data.bundled import BUNDLED_TASKS, bundled_task_specs
from evolve.data.dataset import ImageSet, TaskData
from evolve.data.limits import DataLimits
from evolve.data.loader import check_task_source, load_task_data
from evolve.data.npz import write_npz_task
from evolve.data.preprocess import batch_indices, batch_iterator, preprocess_eval, preprocess_train

__all__ = [
    "BUNDLED_TASKS",
    "DataLimits",
    "ImageSet",
    "TaskData",
    "batch_indices",
    "batch_iterator",
    "bundled_task_specs",
    "check_task_source",
    "load_task_data",
    "preprocess_eval",
    "preprocess_train",
    "write_npz_task",
]
