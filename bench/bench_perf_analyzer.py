"""Triton's perf_analyzer driving an evolve server over gRPC.

perf_analyzer reads the model config, runs ModelInfer at each concurrency and
reads the statistics extension to split the server-side time; it fails on a
server without them. Starts a real server (temporary state directory, a fast
search configuration), runs the bundled "digits" task, runs perf_analyzer
against it, and prints perf_analyzer's report, its CSV rows and, as the last
line, one JSON object (throughput and latency per concurrency, and the
server's own inference counts before and after).

perf_analyzer is not a usable PyPI package (`perf-analyzer` there is an empty
placeholder); the tritonclient wheel ships the binary as `.venv/bin/perf_analyzer`,
which links two libraries that the project does not install:

    apt-get install libb64-0d                            # libb64.so.0d
    pip download --no-deps -d /tmp/cudart nvidia-cuda-runtime-cu12
    unzip -o /tmp/cudart/*.whl -d /tmp/cudart/x          # libcudart.so.12 (no GPU needed)

    python bench/bench_perf_analyzer.py --cudart-dir /tmp/cudart/x/nvidia/cuda_runtime/lib \
        [--batch 4] [--concurrency 1:4:1] [--interval-ms 3000] [--stability 50]

On a shared 2-core machine the default stability (perf_analyzer's 10 %) is
rarely reached; --stability 50 is this script's default.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import serving  # sets up sys.path and the JAX memory environment

TASK = "digits"
IMAGE_SHAPE = "8,8,3"


def find_perf_analyzer() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "perf_analyzer")
    found = shutil.which("perf_analyzer") or (beside if os.path.exists(beside) else None)
    if not found:
        raise SystemExit("perf_analyzer not found: install tritonclient (its wheel ships the binary)")
    return found


def library_env(cudart_dir: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if cudart_dir:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (cudart_dir, env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def check_runs(binary: str, env: dict[str, str]) -> None:
    probe = subprocess.run([binary, "--version"], check=False, env=env, capture_output=True, text=True)
    if "error while loading shared libraries" in probe.stderr:
        raise SystemExit(f"perf_analyzer cannot start: {probe.stderr.strip()}\n(see this file's docstring)")


def inference_counts(target: str) -> dict[str, int]:
    import tritonclient.grpc as triton_grpc  # pylint: disable=import-outside-toplevel

    client = triton_grpc.InferenceServerClient(target)
    try:
        (stats,) = client.get_inference_statistics(TASK).model_stats
        return {"inference_count": stats.inference_count, "execution_count": stats.execution_count,
                "success": stats.inference_stats.success.count, "fail": stats.inference_stats.fail.count}
    finally:
        client.close()


def parse_csv(text: str) -> list[dict[str, float]]:
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        rows.append({
            "concurrency": float(row["Concurrency"]),
            "inferences_per_second": float(row["Inferences/Second"]),
            "p50_ms": float(row["p50 latency"]) / 1000.0,
            "p99_ms": float(row["p99 latency"]) / 1000.0,
            "server_queue_us": float(row["Server Queue"]),
            "server_compute_input_us": float(row["Server Compute Input"]),
            "server_compute_infer_us": float(row["Server Compute Infer"]),
            "server_compute_output_us": float(row["Server Compute Output"]),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cudart-dir", help="a directory holding libcudart.so.12")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--concurrency", default="1:4:1", help="perf_analyzer's --concurrency-range")
    parser.add_argument("--interval-ms", type=int, default=3000, help="perf_analyzer's --measurement-interval")
    parser.add_argument("--stability", type=int, default=50, help="perf_analyzer's --stability-percentage")
    parser.add_argument("--state-dir", help="server state directory (default: a temporary one)")
    args = parser.parse_args()

    binary, env = find_perf_analyzer(), library_env(args.cudart_dir)
    check_runs(binary, env)
    with serving.running_server(args.state_dir, serving.FAST_SEARCH) as (server, client):
        serving.run_task(client, serving.bundled_spec(TASK))
        before = inference_counts(server.target)
        with tempfile.TemporaryDirectory(prefix="perf-analyzer-") as out:
            report = os.path.join(out, "report.csv")
            command = [binary, "-m", TASK, "-i", "grpc", "-u", server.target, "-b", str(args.batch),
                       "--shape", f"images:{IMAGE_SHAPE}", "--concurrency-range", args.concurrency,
                       "--measurement-interval", str(args.interval_ms), "--stability-percentage",
                       str(args.stability), "-f", report]
            print("$ " + " ".join(command), flush=True)
            subprocess.run(command, env=env, check=True)
            with open(report) as handle:
                text = handle.read()
        print(text, flush=True)
        after = inference_counts(server.target)
    print(json.dumps({"task": TASK, "batch": args.batch, "rows": parse_csv(text),
                      "server_stats_before": before, "server_stats_after": after}))


if __name__ == "__main__":
    main()
