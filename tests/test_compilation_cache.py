"""The persistent compilation cache stays under its bound (issue 12): JAX evicts
the least recently used programs. In subprocesses: the cache is process-global."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]

COMPILE_MANY = r"""
import sys
import jax, jax.numpy as jnp
from evolve.engine import enable_compilation_cache
enable_compilation_cache(sys.argv[1], max_bytes=int(sys.argv[2]), min_compile_seconds=0.0)
for i in range(int(sys.argv[3])):
    # a distinct program per i (its shape), each written to the cache
    jax.jit(lambda x: jnp.tanh(x @ x.T).sum() * (i + 1))(jnp.ones((i + 2, 8))).block_until_ready()
"""


def _cache_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def _compile(directory: Path, max_bytes: int, programs: int) -> int:
    subprocess.run([sys.executable, "-c", COMPILE_MANY, str(directory), str(max_bytes), str(programs)],
                   check=True, cwd=PROJECT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    return _cache_bytes(directory)


def test_the_compilation_cache_evicts_beyond_its_bound(tmp_path):
    unbounded = _compile(tmp_path / "unbounded", 0, 12)
    per_program = unbounded / 12
    bound = int(4 * per_program)
    bounded = _compile(tmp_path / "bounded", bound, 12)
    assert unbounded > 2 * bound  # without a bound every program stays
    assert 0 < bounded <= bound + per_program  # an entry is evicted once the total passes the bound
    again = _compile(tmp_path / "bounded", bound, 12)  # a restart over the same directory stays bounded too
    assert again <= bound + per_program
