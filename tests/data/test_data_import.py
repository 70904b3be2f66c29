"""`import evolve.data` and local sources must work without TensorFlow / tfds / gRPC."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEAVY = ("tensorflow", "tensorflow_datasets", "grpc")


def _run(code: str) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_loads_no_tensorflow_tfds_or_grpc():
    loaded = _run(
        f"""
        import json, sys
        import evolve.data
        heavy = {HEAVY!r}
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy)))
        """
    )
    assert loaded == []


def test_local_sources_run_with_tensorflow_blocked():
    """With tensorflow / tfds / grpc unimportable, local sources and preprocessing still work."""
    out = _run(
        f"""
        import importlib.abc, json, os, sys, tempfile
        heavy = {HEAVY!r}

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in heavy:
                    raise ImportError("blocked: " + name)
                return None

        sys.meta_path.insert(0, Block())
        import numpy as np
        from evolve.data import (batch_iterator, bundled_task_specs, load_task_data,
                                 preprocess_eval, preprocess_train, write_npz_task)
        from evolve.types import NpzSource, TaskSpec
        path = os.path.join(tempfile.mkdtemp(), "t.npz")
        images = np.random.default_rng(0).integers(0, 256, (20, 5, 5, 3), dtype=np.uint8)
        write_npz_task(path, images, np.arange(20) % 2)
        npz = load_task_data(TaskSpec("npz", NpzSource(path)))
        digits = load_task_data(bundled_task_specs()[0])
        batch, _ = next(batch_iterator(digits.train, 8, 0))
        hp = dict(crop_area=0.5, flip=True, brightness=0.1, jpeg_quality=0.1)
        train = preprocess_train(batch, 16, hp, np.random.default_rng(0))
        evaluation = preprocess_eval(batch, 16)
        print(json.dumps([len(npz.train), len(digits.train), train.shape[1], evaluation.shape[1]]))
        """
    )
    assert out == [14, 1297, 16, 16]  # 20 npz images: 6 (30%, short of the 200 floor) become validation
