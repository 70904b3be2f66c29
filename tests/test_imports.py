"""`import evolve` (engine included) loads neither gRPC nor TensorFlow."""

import subprocess
import sys

SCRIPT = """
import sys
import evolve, evolve.engine, evolve.checkpoint, evolve.data
bad = sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'tensorflow', 'tensorflow_datasets'))
print(','.join(bad))
"""


def test_engine_imports_neither_grpc_nor_tensorflow():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
