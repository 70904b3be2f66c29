"""Shared pieces of the serving benchmarks: a real server subprocess, a ready
task on it, and the images to send.

The server runs as `python -m service.server` with a temporary state
directory and a small, fast search configuration, exactly as a user starts
it; the benchmarks then talk to it through `service.client.EvolveClient`.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if PROJECT_ROOT not in sys.path:
    sys.path.insert(0, PROJECT_ROOT)

if TYPE_CHECKING:
    from service.demo import ServerProcess

# Two JAX processes (the server and the benchmark) share one accelerator:
# neither may grab most of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# The search that makes a served model quickly (seconds on a CPU).
FAST_SEARCH = ("generations=1", "train_rounds=1", "examples_per_round=256")


@contextlib.contextmanager
def running_server(
    state_dir: str | None, overrides: Sequence[str], *, startup_timeout: float = 300.0,
    extra_args: Sequence[str] = (),
) -> Iterator[tuple[ServerProcess, object]]:
    """A SERVING server and a connected EvolveClient; stops both on exit."""
    from service.client import EvolveClient  # pylint: disable=import-outside-toplevel
    from service.demo import ServerProcess  # pylint: disable=import-outside-toplevel

    with contextlib.ExitStack() as stack:
        if state_dir is None:
            state_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="evolve-bench-"))
        os.makedirs(state_dir, exist_ok=True)
        started = time.monotonic()
        server = ServerProcess(state_dir, overrides=overrides, extra_args=extra_args)
        server.start()
        stack.callback(server.stop)
        server.wait_port(startup_timeout)
        client = stack.enter_context(EvolveClient(server.target, timeout=120.0))
        server.wait_serving(client, startup_timeout)
        seconds = time.monotonic() - started
        print(f"server SERVING on {server.target} after {seconds:.1f}s (state {state_dir})", flush=True)
        yield server, client


def bundled_spec(name: str, **budget):
    from evolve import types  # pylint: disable=import-outside-toplevel

    return types.TaskSpec(name=name, source=types.BundledSource(name=name), budget=types.SearchBudget(**budget))


def run_task(client, spec, timeout: float = 1800.0) -> float:
    """Submits a task and waits until its search succeeded; returns seconds."""
    started = time.monotonic()
    operation = client.submit_task(spec)
    operation = client.wait_done(operation.name, poll=10.0, timeout=timeout)
    if operation.HasField("error"):
        raise RuntimeError(f"the search of {spec.name} failed: {operation.error.code} {operation.error.message}")
    return time.monotonic() - started


def digits_images(count: int) -> np.ndarray:
    """`count` real 8x8 uint8 RGB digit images (the test split, repeated as needed)."""
    from evolve.data.bundled import load_bundled  # pylint: disable=import-outside-toplevel
    from evolve.types import BundledSource  # pylint: disable=import-outside-toplevel

    test = load_bundled(BundledSource("digits"), None).test.images
    return np.ascontiguousarray(np.resize(test, (count,) + test.shape[1:]))


def percentile_ms(seconds: Sequence[float], q: float) -> float:
    return 1000.0 * float(np.percentile(np.asarray(seconds), q)) if seconds else float("nan")


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")
