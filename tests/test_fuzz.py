"""Fuzz test (issue 5): malformed and random requests to every RPC of
evolve.v1.EvolutionService and inference.GRPCInferenceService on a real
server started with --data-root.

Requests travel as raw bytes (identity serializers), so random bytes, damaged
messages and invalid UTF-8 reach the server as a broken client would send
them. The server must answer each one with a status code, never UNKNOWN or
INTERNAL; requests that happen to be valid may succeed (counted apart, and
few); it must stay up, keep serving the same predictions, and its memory
must stay bounded. A JSON report with the counts per status code is printed
and written next to the test's temporary files.

Memory: valid requests among the random ones (an Improve that parses as
"improve every task", a submit of a bundled task) start searches, and each
new model structure a search compiles stays in JAX's caches; that is search
memory, not request memory. So after the random round the searches are
cancelled and the server left idle, and every request that was rejected
(never starting work) is replayed REPLAYS times: the server's RSS across the
replays must grow by less than MAX_RSS_GROWTH_MB.

Fixed seed: the same requests every run.
"""

from __future__ import annotations

import collections
import io
import json
import math
import random
import struct
import time
import zlib
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.longrunning import operations_pb2
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status
from PIL import Image

from evolve.data import load_task_data, write_npz_task
from evolve.types import BundledSource, TaskSpec
from service.gen.evolve.v1 import evolve_pb2, evolve_pb2_grpc
from service.gen.inference import grpc_predict_v2_pb2 as infer_pb2
from service.gen.inference import grpc_predict_v2_pb2_grpc as infer_pb2_grpc
from tests.service.conftest import ServerFactory, health_status

pytestmark = pytest.mark.slow

SEED = 1729
RANDOM_REQUESTS = 3000  # after the targeted ones
THREADS = 8
TIMEOUT = 30.0
WATCH_TIMEOUT = 0.5  # a valid WatchEvolution streams until the deadline
MAX_MESSAGE_MB = 4
MAX_BATCH = 64
MAX_RSS_GROWTH_MB = 300
REPLAYS = 2
CONTENT_CASES = 4  # bad data behind a good spec: accepted, and the operation fails
REJECTED = {"INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION"}
OK_SHARE = 0.15  # at most this share of the random requests may be valid

EVOLVE = "/evolve.v1.EvolutionService/"
INFER = "/inference.GRPCInferenceService/"
LRO = "/google.longrunning.Operations/"
# method -> (request type, server-streaming?)
METHODS = {
    EVOLVE + "SubmitTask": (evolve_pb2.SubmitTaskRequest, False),
    EVOLVE + "GetOperation": (evolve_pb2.GetOperationRequest, False),
    EVOLVE + "ListOperations": (evolve_pb2.ListOperationsRequest, False),
    EVOLVE + "CancelOperation": (evolve_pb2.CancelOperationRequest, False),
    EVOLVE + "WaitOperation": (evolve_pb2.WaitOperationRequest, False),
    EVOLVE + "DeleteOperation": (evolve_pb2.DeleteOperationRequest, False),
    EVOLVE + "GetTask": (evolve_pb2.GetTaskRequest, False),
    EVOLVE + "ListTasks": (evolve_pb2.ListTasksRequest, False),
    EVOLVE + "Improve": (evolve_pb2.ImproveRequest, False),
    EVOLVE + "WatchEvolution": (evolve_pb2.WatchEvolutionRequest, True),
    EVOLVE + "Predict": (evolve_pb2.PredictRequest, False),
    EVOLVE + "GetSystem": (evolve_pb2.GetSystemRequest, False),
    EVOLVE + "DeleteTask": (evolve_pb2.DeleteTaskRequest, False),
    INFER + "ServerLive": (infer_pb2.ServerLiveRequest, False),
    INFER + "ServerReady": (infer_pb2.ServerReadyRequest, False),
    INFER + "ModelReady": (infer_pb2.ModelReadyRequest, False),
    INFER + "ServerMetadata": (infer_pb2.ServerMetadataRequest, False),
    INFER + "ModelMetadata": (infer_pb2.ModelMetadataRequest, False),
    INFER + "ModelInfer": (infer_pb2.ModelInferRequest, False),
    INFER + "ModelConfig": (infer_pb2.ModelConfigRequest, False),
    INFER + "ModelStatistics": (infer_pb2.ModelStatisticsRequest, False),
    INFER + "RepositoryIndex": (infer_pb2.RepositoryIndexRequest, False),
    LRO + "GetOperation": (operations_pb2.GetOperationRequest, False),
    LRO + "ListOperations": (operations_pb2.ListOperationsRequest, False),
    LRO + "CancelOperation": (operations_pb2.CancelOperationRequest, False),
    LRO + "DeleteOperation": (operations_pb2.DeleteOperationRequest, False),
    LRO + "WaitOperation": (operations_pb2.WaitOperationRequest, False),
}
EMPTY_REQUESTS = {EVOLVE + "GetSystem", INFER + "ServerLive", INFER + "ServerReady", INFER + "ServerMetadata"}
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
PROBE = np.random.default_rng(1234).integers(0, 256, size=(16, 8, 8, 3), dtype=np.uint8)


# ---- files under and outside the data root ----------------------------------------------


def _png(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), 7).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), 99).save(buffer, format="JPEG")
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming a size, and no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


def _image_folder(root: Path, corrupt: bool) -> Path:
    for label in ("a", "b"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for index in range(3):
            data = b"\x89PNG\r\n\x1a\nnot really" if corrupt else _png(8, 8)
            (root / label / f"{index}.png").write_bytes(data)
    return root


def make_files(base: Path) -> dict[str, str]:
    """The data root with good and bad data, and good data outside it."""
    root, outside, evil = base / "data", base / "outside", base / "data_evil"
    for directory in (root, outside, evil):
        directory.mkdir(parents=True)
    digits = load_task_data(TaskSpec("digits", BundledSource("digits")))
    good = (digits.train.images[:200], digits.train.labels[:200] % 2)
    write_npz_task(root / "inside.npz", *good)
    write_npz_task(outside / "task.npz", *good)
    write_npz_task(evil / "task.npz", *good)
    (root / "garbage.npz").write_bytes(random.Random(SEED).randbytes(4096))
    (root / "empty.npz").write_bytes(b"")
    (root / "notes.txt").write_text("not data")
    np.save(root / "single.npy", np.zeros((4, 8, 8), np.uint8))
    np.savez(root / "pickled.npz", train_images=np.array([object()], dtype=object), train_labels=np.zeros(1))
    write_npz_task(root / "nan.npz", np.full((20, 8, 8), np.nan, np.float32), np.zeros(20, np.int64))
    write_npz_task(root / "bad_labels.npz", good[0], good[1] - 5)
    write_npz_task(root / "huge_image.npz", np.zeros((2, 1, 70000), np.uint8), np.array([0, 1]))
    _image_folder(root / "corrupt_folder", corrupt=True)
    _image_folder(outside / "folder", corrupt=False)
    (root / "one_class" / "a").mkdir(parents=True)
    (root / "escape_link.npz").symlink_to(outside / "task.npz")
    (root / "escape_dir").symlink_to(outside / "folder")
    (root / "loop").symlink_to(root / "loop")
    return {"root": str(root), "outside": str(outside), "evil": str(evil)}


# ---- request generation ----------------------------------------------------------------------


class Generator:
    """Malformed, random and (rarely) valid requests, from a fixed seed."""

    def __init__(self, files: dict[str, str]):
        self.rng = random.Random(SEED)
        self.np = np.random.default_rng(SEED)
        self.files = files
        root, outside = files["root"], files["outside"]
        self.strings = [
            "", " ", "\n", "\t", ".", "..", "./", "/", "~", "$HOME", "%s%n%x", "{0}", "'; DROP TABLE tasks;--",
            "digits", "digits\n", "DIGITS", "digits ", " digits", "digits/../digits", "d" * 63, "d" * 64, "x" * 5000,
            "../../etc/passwd", "/etc/passwd", "/etc/shadow", "/proc/self/environ", "/dev/zero", "/", "..\\..\\x",
            "C:\\Windows\\system32", "\\\\server\\share", "file:///etc/passwd", "gs://bucket/x", "http://x/y",
            "名前", "تست", "\u202eevil", "\u200b", "💥" * 8, "e\u0301", "\x00", "a\x00b", "\x7f", "\ufeffbom",
            "operations/", "operations/1", "operations/0", "operations/-1", "operations/99999999999999999999999",
            "operations/../1", "operations/1\n", "operations/１", "o", "o1", "o-1", "o²", "o١٢", "o" + "9" * 30,
            "__root__", "digits_parity", "digits_loops", "inside", "inside.npz", "1", "-1",
            f"{outside}/task.npz", f"{outside}/folder", f"{files['evil']}/task.npz", f"{root}/../outside/task.npz",
            "../outside/task.npz", "escape_link.npz", "escape_dir", "loop", "garbage.npz", "empty.npz", "notes.txt",
            "single.npy", "pickled.npz", "nan.npz", "bad_labels.npz", "huge_image.npz", "corrupt_folder",
            "one_class", root, root + "/", root + "/.", "missing.npz", "a/b/c/d.npz",
        ]
        self.int32 = [0, 1, -1, 2, 3, 7, 8, 64, 100, 1000, 4096, 4097, 10_000, 2**31 - 1, -(2**31)]
        self.int64 = self.int32 + [2**32, 2**62, 2**63 - 1, -(2**63)]
        self.floats = [0.0, -0.0, 0.5, 1.0, -1.0, 1.5, 1e-9, 1e308, 5e-324, math.nan, math.inf, -math.inf]
        self.datatypes = ["UINT8", "FP32", "", "uint8", "fp32", "INT64", "INT8", "FP16", "FP64", "BYTES", "BOOL",
                          "UINT8 ", "БАЙТ", "FP32\x00"]

    # -- pieces --------------------------------------------------------------------------------

    def string(self) -> str:
        roll = self.rng.random()
        if roll < 0.8:
            return self.rng.choice(self.strings)
        if roll < 0.9:
            return "".join(chr(self.rng.randrange(0x20, 0x7F)) for _ in range(self.rng.randrange(1, 40)))
        return "".join(chr(self.rng.choice([self.rng.randrange(0xA0, 0xD7FF), self.rng.randrange(0xE000, 0x10FFFF)]))
                       for _ in range(self.rng.randrange(1, 20)))

    def shape(self) -> list[int]:
        roll = self.rng.random()
        if roll < 0.3:
            return [self.rng.choice([1, 2, 3]), 8, 8, self.rng.choice([1, 3])]
        if roll < 0.4:
            return [8, 8, 3]
        if roll < 0.5:
            return [self.rng.randrange(1, 70), self.rng.randrange(1, 5), self.rng.randrange(1, 5), 3]
        return [self.rng.choice(self.int64) for _ in range(self.rng.randrange(0, 7))]

    def pixels(self, shape: list[int], datatype: str) -> bytes:
        """Bytes for a shape: usually the right length when it is small, with bad values."""
        count = math.prod(shape) if shape and all(0 <= d <= 1_000_000 for d in shape) else -1
        itemsize = 4 if datatype.upper().startswith("FP32") else 1
        if 0 <= count <= 200_000 and self.rng.random() < 0.7:
            if itemsize == 4:
                values = self.np.random(count).astype("<f4")
                if self.rng.random() < 0.7:
                    bad = self.rng.choice([np.nan, np.inf, -np.inf, -0.5, 1.5, 255.0])
                    values[self.np.integers(0, max(count, 1), size=min(count, 3))] = bad
                return values.tobytes()
            return self.np.integers(0, 256, size=count, dtype=np.uint8).tobytes()
        return self.rng.randbytes(self.rng.choice([0, 1, 3, 7, 64, 191, 192, 193, 4096]))

    def tensor(self) -> evolve_pb2.Tensor:
        shape, datatype = self.shape(), self.rng.choice(self.datatypes)
        return evolve_pb2.Tensor(shape=shape, datatype=datatype, data=self.pixels(shape, datatype))

    def encoded(self) -> evolve_pb2.EncodedImages:
        options = [
            lambda: self.rng.randbytes(self.rng.randrange(0, 300)),
            lambda: _png(8, 8),
            lambda: _png(8, 8)[: self.rng.randrange(8, 60)],
            lambda: _jpeg(8, 8),
            lambda: _jpeg(8, 8)[:-20],
            lambda: _png(self.rng.randrange(1, 20), self.rng.randrange(1, 20), self.rng.choice(["L", "RGBA", "P"])),
            lambda: _png_header_only(self.rng.choice([0, 1, 4097, 100_000, 2**31 - 1]), 8),
            lambda: b"GIF89a" + self.rng.randbytes(30),
            lambda: b"",
        ]
        count = self.rng.choice([0, 1, 1, 2, 3, 70])
        return evolve_pb2.EncodedImages(images=[self.rng.choice(options)() for _ in range(count)])

    def duration(self) -> duration_pb2.Duration:
        """Valid, negative, out-of-range and mixed-sign Durations (at most ~2 s when valid)."""
        seconds = self.rng.choice([0, 0, 1, 2, -1, 2**40, -(2**62), 315_576_000_001])
        nanos = self.rng.choice([0, 0, 5, 500_000_000, -1, 999_999_999, 10**9, -(2**31)])
        return duration_pb2.Duration(seconds=seconds, nanos=nanos)

    def operation_filter(self) -> str:
        roll = self.rng.random()
        if roll < 0.5:
            return self.string()
        terms = [f'{self.rng.choice(["task", "done", "state", "kind", "name", "AND", "("])}'
                 f' {self.rng.choice(["=", "!=", ":", "", "=="])} {self.rng.choice([self.string(), "true", "x"])}'
                 for _ in range(self.rng.randrange(1, 4))]
        return self.rng.choice([" AND ", " OR ", " "]).join(terms)

    def spec(self) -> evolve_pb2.TaskSpec:
        spec = evolve_pb2.TaskSpec()
        if self.rng.random() < 0.9:
            spec.name = self.string() if self.rng.random() < 0.6 else f"fuzz-{self.rng.randrange(10**6)}"
        source = self.rng.choice(["none", "tfds", "npz", "npz", "image_folder", "bundled"])
        if source == "tfds":
            spec.tfds.name = self.string()
            for field in ("data_dir", "train_split", "validation_split", "test_split", "image_key", "label_key"):
                if self.rng.random() < 0.4:
                    setattr(spec.tfds, field, self.string())
        elif source == "npz":
            spec.npz.path = self.string()
        elif source == "image_folder":
            spec.image_folder.path = self.string()
            if self.rng.random() < 0.5:
                spec.image_folder.validation_fraction = self.rng.choice(self.floats)
            if self.rng.random() < 0.5:
                spec.image_folder.test_fraction = self.rng.choice(self.floats)
        elif source == "bundled":
            spec.bundled.name = self.string()
        for field in ("generations", "candidates_per_generation", "train_rounds", "examples_per_round"):
            if self.rng.random() < 0.2:
                setattr(spec.budget, field, self.rng.choice(self.int32))
        return spec

    def parameters(self, target) -> None:
        for _ in range(self.rng.choice([0, 0, 1, 3])):
            parameter = target[self.string()]
            kind = self.rng.choice(["bool_param", "int64_param", "string_param", "double_param", "uint64_param"])
            value = {"bool_param": True, "int64_param": self.rng.choice(self.int64), "string_param": self.string(),
                     "double_param": self.rng.choice(self.floats), "uint64_param": 2**64 - 1}[kind]
            setattr(parameter, kind, value)

    def infer(self) -> infer_pb2.ModelInferRequest:
        request = infer_pb2.ModelInferRequest(
            model_name=self.rng.choice(["digits", "digits", self.string()]),
            model_version=self.rng.choice(["", "1", "2", self.string()]), id=self.string(),
        )
        self.parameters(request.parameters)
        for _ in range(self.rng.choice([0, 1, 1, 1, 2])):
            tensor = request.inputs.add(name=self.rng.choice(["images", "", "x", self.string()]),
                                        datatype=self.rng.choice(self.datatypes), shape=self.shape())
            self.parameters(tensor.parameters)
            roll = self.rng.random()
            count = math.prod(tensor.shape) if tensor.shape and all(0 <= d <= 5000 for d in tensor.shape) else 12
            count = min(count, 20_000)
            if roll < 0.25:
                tensor.contents.uint_contents.extend(self.rng.choice([0, 255, 256, 2**32 - 1]) for _ in range(count))
            elif roll < 0.5:
                tensor.contents.fp32_contents.extend(self.rng.choice(self.floats) for _ in range(count))
            elif roll < 0.6:
                tensor.contents.int64_contents.extend(self.rng.choice(self.int64) for _ in range(count))
                tensor.contents.bytes_contents.append(self.rng.randbytes(10))
            elif roll < 0.9:
                request.raw_input_contents.append(self.pixels(list(tensor.shape), tensor.datatype))
        for _ in range(self.rng.choice([0, 1, 2])):
            request.raw_input_contents.append(self.rng.randbytes(self.rng.randrange(0, 200)))
        for _ in range(self.rng.choice([0, 0, 1, 2])):
            output = request.outputs.add(name=self.rng.choice(["probabilities", "classes", "", self.string()]))
            self.parameters(output.parameters)
        return request

    def structured(self, method: str):
        name = method.rsplit("/", 1)[1]
        rng, s = self.rng, self.string
        if name == "SubmitTask":
            return evolve_pb2.SubmitTaskRequest(spec=self.spec(), request_id=rng.choice(["", s(), "r" * 300]))
        if name in ("GetOperation", "CancelOperation", "DeleteOperation"):
            return METHODS[method][0](name=s())
        if name == "WaitOperation":
            request = METHODS[method][0](name=s())
            if method.startswith(EVOLVE) and rng.random() < 0.5:
                request.timeout_seconds = rng.choice(self.floats)
            if method.startswith(LRO) or rng.random() < 0.5:
                request.timeout.CopyFrom(self.duration())
            return request
        if name in ("ListOperations", "ListTasks"):
            request = METHODS[method][0](page_size=rng.choice(self.int32), page_token=s())
            if name == "ListOperations":
                request.filter = self.operation_filter()
                if method.startswith(EVOLVE) and rng.random() < 0.3:
                    request.task = s()
                if method.startswith(LRO) and rng.random() < 0.3:
                    request.name = s()
            return request
        if name == "GetTask":
            return evolve_pb2.GetTaskRequest(name=s())
        if name == "DeleteTask":  # never the fuzz server's own tasks: later checks predict with them
            task = s()
            return evolve_pb2.DeleteTaskRequest(name=f"x{task}" if task.startswith("digits") else task)
        if name == "Improve":
            return evolve_pb2.ImproveRequest(task=s(), request_id=rng.choice(["", s(), "r" * 300]))
        if name == "WatchEvolution":
            return evolve_pb2.WatchEvolutionRequest(task=s(), after_sequence=rng.choice(self.int64))
        if name == "Predict":
            request = evolve_pb2.PredictRequest(task=rng.choice(["digits", "digits", s()]))
            roll = rng.random()
            if roll < 0.6:
                request.array.CopyFrom(self.tensor())
            elif roll < 0.9:
                request.encoded.CopyFrom(self.encoded())
            return request
        if name == "RepositoryIndex":
            return infer_pb2.RepositoryIndexRequest(repository_name=rng.choice(["", s()]), ready=rng.random() < 0.5)
        if name in ("ModelReady", "ModelMetadata", "ModelConfig", "ModelStatistics"):
            return METHODS[method][0](name=rng.choice(["digits", s()]), version=rng.choice(["", "0", "1", s()]))
        if name == "ModelInfer":
            return self.infer()
        return METHODS[method][0]()

    # -- whole requests ------------------------------------------------------------------------

    def mutate(self, data: bytes) -> bytes:
        data = bytearray(data or b"\x00")
        for _ in range(self.rng.randrange(1, 4)):
            roll = self.rng.random()
            index = self.rng.randrange(len(data))
            if roll < 0.4:
                data[index] ^= 1 << self.rng.randrange(8)
            elif roll < 0.6:
                del data[index:]
            elif roll < 0.8:
                data[index:index] = self.rng.randbytes(self.rng.randrange(1, 8))
            else:
                data[index] = self.rng.choice([0x00, 0x7F, 0x80, 0xFF])
            if not data:
                data = bytearray(b"\xff")
        return bytes(data)

    def request(self) -> tuple[str, str, bytes]:
        """(kind, method, serialized request)."""
        methods = [m for m in METHODS if m not in EMPTY_REQUESTS]
        roll = self.rng.random()
        if roll < 0.06:  # the empty-request RPCs can only be broken at the byte level
            method = self.rng.choice(sorted(EMPTY_REQUESTS))
            return "random bytes", method, self.rng.randbytes(self.rng.randrange(1, 64))
        method = self.rng.choice(methods)
        if roll < 0.25:
            return "random bytes", method, self.rng.randbytes(self.rng.randrange(1, 256))
        if roll < 0.4:
            return "damaged message", method, self.mutate(self.structured(method).SerializeToString())
        return "malformed fields", method, self.structured(method).SerializeToString()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _invalid_utf8(field: int) -> bytes:
    return bytes([(field << 3) | 2, 2]) + b"\xc3\x28"


def targeted(files: dict[str, str]) -> list[tuple[str, str, bytes, set[grpc.StatusCode]]]:
    """Hand-made bad requests, each with the status codes it may get."""
    invalid = {grpc.StatusCode.INVALID_ARGUMENT}
    root, outside = files["root"], files["outside"]
    cases = []

    def add(what, method, message, codes=invalid):
        data = message if isinstance(message, bytes) else message.SerializeToString()
        cases.append((what, EVOLVE + method if "/" not in method else method, data, codes))

    def submit(what, spec, codes=invalid, request_id=""):
        if spec.name == "escape":  # a distinct valid name each, so that a wrongly accepted one shows alone
            spec.name = f"escape-{len(cases)}"
        add(what, "SubmitTask", evolve_pb2.SubmitTaskRequest(spec=spec, request_id=request_id), codes)

    npz = lambda path: evolve_pb2.TaskSpec(name="escape", npz=evolve_pb2.NpzSource(path=path))  # noqa: E731
    for path in ("../outside/task.npz", f"{outside}/task.npz", "/etc/passwd", "../../etc/passwd", "escape_link.npz",
                 f"{files['evil']}/task.npz", f"{root}/../outside/task.npz", "..", "/", "loop", "garbage.npz",
                 "empty.npz", "single.npy", "pickled.npz", "notes.txt", "missing.npz",
                 "a\x00b", "x" * 5000, "/proc/self/environ", "/dev/zero"):
        submit(f"npz path {path[:40]!r}", npz(path))
    # Bad contents behind good headers: SubmitTask only checks the spec, so these
    # are accepted and their operations fail (CONTENT_CASES, checked separately).
    for path in ("nan.npz", "bad_labels.npz"):
        submit(f"npz contents {path!r}", npz(path), {grpc.StatusCode.OK})
    submit("image folder contents 'corrupt_folder'",
           evolve_pb2.TaskSpec(name="escape", image_folder=evolve_pb2.ImageFolderSource(path="corrupt_folder")),
           {grpc.StatusCode.OK})
    for path in (f"{outside}/folder", "escape_dir", "../outside/folder", "one_class", "/"):
        submit(f"image folder {path[:40]!r}",
               evolve_pb2.TaskSpec(name="escape", image_folder=evolve_pb2.ImageFolderSource(path=path)))
    for data_dir in ("../outside", "/etc", "/", outside, "escape_dir"):
        submit(f"tfds data_dir {data_dir!r}",
               evolve_pb2.TaskSpec(name="escape", tfds=evolve_pb2.TfdsSource(name="not_a_dataset", data_dir=data_dir)))
    submit("tfds unknown data set", evolve_pb2.TaskSpec(name="escape", tfds=evolve_pb2.TfdsSource(name="zz_nope")),
           {grpc.StatusCode.OK})
    submit("tfds name traversal", evolve_pb2.TaskSpec(name="escape", tfds=evolve_pb2.TfdsSource(name="../../x")))
    for name in ("", "DIGITS", "a" * 64, "digits2\n", "../x", "名前", "a b", "\u202eevil", "-x", "x" * 100_000):
        submit(f"task name {name[:20]!r}",
               evolve_pb2.TaskSpec(name=name, bundled=evolve_pb2.BundledSource(name="digits")))
    submit("existing task", evolve_pb2.TaskSpec(name="digits", bundled=evolve_pb2.BundledSource(name="digits")),
           {grpc.StatusCode.ALREADY_EXISTS})
    submit("no source", evolve_pb2.TaskSpec(name="nosource"))
    submit("unknown bundled", evolve_pb2.TaskSpec(name="b1", bundled=evolve_pb2.BundledSource(name="../digits")))
    submit("budget out of range", evolve_pb2.TaskSpec(
        name="b2", bundled=evolve_pb2.BundledSource(name="digits"), budget=evolve_pb2.SearchBudget(generations=-1)))
    submit("NaN fraction", evolve_pb2.TaskSpec(
        name="b3", image_folder=evolve_pb2.ImageFolderSource(path="corrupt_folder", validation_fraction=math.nan)))
    submit("long request id", evolve_pb2.TaskSpec(name="b4", bundled=evolve_pb2.BundledSource(name="digits")),
           request_id="r" * 300)

    def predict(what, tensor=None, encoded=None, codes=invalid, task="digits"):
        request = evolve_pb2.PredictRequest(task=task)
        if tensor is not None:
            request.array.CopyFrom(tensor)
        if encoded is not None:
            request.encoded.CopyFrom(evolve_pb2.EncodedImages(images=encoded))
        add(what, "Predict", request, codes)

    def fp32(values, shape=(1, 2, 2, 3)):
        return evolve_pb2.Tensor(shape=list(shape), datatype="FP32", data=np.asarray(values, "<f4").tobytes())

    for bad in (math.nan, math.inf, -math.inf, -0.5, 1.5):
        predict(f"FP32 pixel {bad}", fp32([bad] + [0.5] * 11))
    for shape in ([2**62, 8, 8, 3], [-1, 8, 8, 3], [0, 8, 8, 3], [1, 0, 8, 3], [1, 8, 8, 2], [1, 8, 8], [8, 8],
                  [], [1, 1, 1, 1, 3], [1, 4097, 1, 3], [2**63 - 1] * 4, [1] * 10_000):
        predict(f"shape {str(shape)[:30]}", evolve_pb2.Tensor(shape=shape, datatype="UINT8", data=bytes(192)))
    predict("byte length mismatch", evolve_pb2.Tensor(shape=[1, 8, 8, 3], datatype="UINT8", data=bytes(191)))
    predict("FP32 length not a multiple of 4", evolve_pb2.Tensor(shape=[1, 8, 8, 3], datatype="FP32", data=bytes(767)))
    for datatype in ("INT64", "", "fp32", "BYTES", "FP16"):
        predict(f"datatype {datatype!r}", evolve_pb2.Tensor(shape=[1, 8, 8, 3], datatype=datatype, data=bytes(192)))
    predict("no input", codes=invalid)
    predict("empty encoded batch", encoded=[])
    predict("undecodable image", encoded=[b"not an image"])
    predict("truncated PNG", encoded=[_png(8, 8)[:40]])
    predict("PNG claiming 100000 x 8", encoded=[_png_header_only(100_000, 8)])
    predict("images of two sizes", encoded=[_png(8, 8), _png(6, 8)])
    predict("decompression bomb batch", encoded=[_png(4096, 4096)] * 12)
    predict("batch over --max-batch", evolve_pb2.Tensor(shape=[MAX_BATCH + 1, 1, 1, 3], datatype="UINT8",
                                                        data=bytes((MAX_BATCH + 1) * 3)),
            codes={grpc.StatusCode.RESOURCE_EXHAUSTED})
    predict("request over --max-message-mb", evolve_pb2.Tensor(
        shape=[1, 1024, 1024, 3], datatype="FP32", data=bytes((MAX_MESSAGE_MB + 1) * 2**20)),
        codes={grpc.StatusCode.RESOURCE_EXHAUSTED})
    predict("unknown task", evolve_pb2.Tensor(shape=[1, 8, 8, 3], datatype="UINT8", data=bytes(192)),
            codes={grpc.StatusCode.NOT_FOUND}, task="../../etc/passwd")
    predict("huge task name", evolve_pb2.Tensor(shape=[1, 8, 8, 3], datatype="UINT8", data=bytes(192)),
            codes={grpc.StatusCode.NOT_FOUND}, task="t" * 1_000_000)

    def infer(what, request, codes=invalid):
        add(what, INFER + "ModelInfer", request, codes)

    def infer_request(**tensor):
        request = infer_pb2.ModelInferRequest(model_name="digits")
        request.inputs.add(name="images", **tensor)
        return request

    request = infer_request(datatype="UINT8", shape=[1, 2, 2, 3])
    request.inputs[0].contents.uint_contents.extend([256] * 12)
    infer("UINT8 content over 255", request)
    request = infer_request(datatype="FP32", shape=[1, 2, 2, 3])
    request.inputs[0].contents.fp32_contents.extend([math.nan] * 12)
    infer("FP32 NaN contents", request)
    request = infer_request(datatype="UINT8", shape=[1, 2, 2, 3])
    request.inputs.add(name="images", datatype="UINT8", shape=[1, 2, 2, 3])
    infer("two inputs", request)
    request = infer_request(datatype="UINT8", shape=[1, 2, 2, 3])
    request.inputs[0].contents.uint_contents.extend([1] * 12)
    request.raw_input_contents.append(bytes(12))
    infer("raw and typed contents", request)
    request = infer_request(datatype="UINT8", shape=[1, 2, 2, 3])
    request.raw_input_contents.extend([bytes(12), bytes(12)])
    infer("two raw contents for one input", request)
    request = infer_request(datatype="UINT8", shape=[1, 2, 2, 3])
    request.raw_input_contents.append(bytes(12))
    request.outputs.add(name="../../etc/passwd")
    infer("unknown output", request)
    infer("no inputs", infer_pb2.ModelInferRequest(model_name="digits"))
    request = infer_request(datatype="UINT8", shape=[1, 2, 2, 3])
    request.raw_input_contents.append(bytes(12))
    request.model_version = "999"
    infer("unknown version", request, {grpc.StatusCode.NOT_FOUND})
    add("model metadata of an unknown version", INFER + "ModelMetadata",
        infer_pb2.ModelMetadataRequest(name="digits", version="../1"), {grpc.StatusCode.NOT_FOUND})
    add("model metadata without a name", INFER + "ModelMetadata", infer_pb2.ModelMetadataRequest(), invalid)

    add("wait NaN", "WaitOperation", evolve_pb2.WaitOperationRequest(name="operations/1", timeout_seconds=math.nan))
    add("wait negative", "WaitOperation", evolve_pb2.WaitOperationRequest(name="operations/1", timeout_seconds=-1))
    for token in ("o²", "o١٢", "o-1", "garbage", "o" + "9" * 30, "o1\n"):
        add(f"page token {token!r}", "ListTasks", evolve_pb2.ListTasksRequest(page_token=token))
        add(f"operations page token {token!r}", "ListOperations", evolve_pb2.ListOperationsRequest(page_token=token))
    add("negative page size", "ListTasks", evolve_pb2.ListTasksRequest(page_size=-1))
    add("watch negative sequence", "WatchEvolution", evolve_pb2.WatchEvolutionRequest(after_sequence=-5))
    add("improve long request id", "Improve", evolve_pb2.ImproveRequest(task="nope", request_id="r" * 300))
    add("improve unknown task", "Improve", evolve_pb2.ImproveRequest(task="../etc"), {grpc.StatusCode.NOT_FOUND})
    add("operation name traversal", "GetOperation", evolve_pb2.GetOperationRequest(name="operations/../1"),
        {grpc.StatusCode.NOT_FOUND})
    add("wait negative Duration", "WaitOperation",
        evolve_pb2.WaitOperationRequest(name="operations/1", timeout=duration_pb2.Duration(seconds=-1)))
    add("wait Duration and timeout_seconds", "WaitOperation", evolve_pb2.WaitOperationRequest(
        name="operations/1", timeout=duration_pb2.Duration(seconds=1), timeout_seconds=1))
    add("standard wait mixed-sign Duration", LRO + "WaitOperation", operations_pb2.WaitOperationRequest(
        name="operations/1", timeout=duration_pb2.Duration(seconds=1, nanos=-1)))
    add("list filter and task", "ListOperations", evolve_pb2.ListOperationsRequest(task="digits", filter="done = true"))
    for text in ('task != "digits"', "done = maybe", "(done = true)", 'task = "x" OR done = true', 'task = "x',
                 "state = PAUSED", "x" * 5000):
        add(f"list filter {text[:20]!r}", "ListOperations", evolve_pb2.ListOperationsRequest(filter=text))
        add(f"standard list filter {text[:20]!r}", LRO + "ListOperations",
            operations_pb2.ListOperationsRequest(filter=text))
    add("standard list of another collection", LRO + "ListOperations",
        operations_pb2.ListOperationsRequest(name="projects/p/operations"))
    add("delete unknown operation", LRO + "DeleteOperation", operations_pb2.DeleteOperationRequest(
        name="operations/999999"), {grpc.StatusCode.NOT_FOUND})
    add("delete without a name", "DeleteOperation", evolve_pb2.DeleteOperationRequest())
    add("empty operation name", "CancelOperation", evolve_pb2.CancelOperationRequest(), invalid)
    add("empty task name", "GetTask", evolve_pb2.GetTaskRequest(), invalid)

    # No request message has an enum field; unknown fields are ignored, and an
    # int32 sent as a 64-bit varint is truncated (here to -5).
    unknown_field = evolve_pb2.GetTaskRequest(name="digits").SerializeToString() + bytes([15 << 3, 0xE7, 0x07])
    add("unknown field", "GetTask", unknown_field, {grpc.StatusCode.OK})
    add("page_size as a 64-bit varint", "ListTasks", bytes([1 << 3]) + _varint(2**32 - 5))

    for method, (kind, _) in METHODS.items():
        add(f"{method} random bytes", method, b"\xff\xff\xff\xff")
        add(f"{method} truncated varint", method, b"\x08\x80")
        add(f"{method} nested groups", method, b"\x0b" * 200 + b"\x0c" * 200)
        add(f"{method} length past the end", method, b"\x0a\xff\xff\xff\x0f")
        if any(f.type == f.TYPE_STRING and f.number == 1 for f in kind.DESCRIPTOR.fields):
            add(f"{method} invalid UTF-8", method, _invalid_utf8(1))
    return cases


# ---- running requests ----------------------------------------------------------------------------

IDENTITY = lambda data: data  # noqa: E731


def call(channel: grpc.Channel, method: str, data: bytes) -> tuple[grpc.StatusCode, grpc.RpcError | None]:
    streaming = METHODS[method][1]
    try:
        if streaming:
            responses = channel.unary_stream(method, request_serializer=IDENTITY, response_deserializer=IDENTITY)
            for _ in responses(data, timeout=WATCH_TIMEOUT):
                pass
        else:
            unary = channel.unary_unary(method, request_serializer=IDENTITY, response_deserializer=IDENTITY)
            unary(data, timeout=TIMEOUT)
        return grpc.StatusCode.OK, None
    except grpc.RpcError as error:
        return error.code(), error


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _field_violations(error: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(error)
    fields = []
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            fields += [v.field for v in bad_request.field_violations]
    return fields


def _predict(channel) -> tuple[int, bytes]:
    stub = evolve_pb2_grpc.EvolutionServiceStub(channel)
    tensor = evolve_pb2.Tensor(shape=list(PROBE.shape), datatype="UINT8", data=PROBE.tobytes())
    response = stub.Predict(evolve_pb2.PredictRequest(task="digits", array=tensor), timeout=TIMEOUT)
    return response.path_version, response.probabilities.data


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    factory = ServerFactory(tmp_path_factory, tmp_path_factory.mktemp("xla_cache"))
    yield factory
    factory.close()


def test_fuzz_every_rpc(factory, tmp_path, record_property):
    started = time.monotonic()
    files = make_files(tmp_path)
    server = factory.start("--data-root", files["root"], "--max-queue", "2", "--max-batch", str(MAX_BATCH),
                           "--max-message-mb", str(MAX_MESSAGE_MB), "--seed", "1")
    options = [("grpc.max_send_message_length", 64 * 2**20), ("grpc.max_receive_message_length", 64 * 2**20)]
    channel = grpc.insecure_channel(server.address, options=options)
    stub = evolve_pb2_grpc.EvolutionServiceStub(channel)
    submitted = stub.SubmitTask(evolve_pb2.SubmitTaskRequest(
        spec=evolve_pb2.TaskSpec(name="digits", bundled=evolve_pb2.BundledSource(name="digits"))), timeout=TIMEOUT)
    done = stub.WaitOperation(evolve_pb2.WaitOperationRequest(name=submitted.name, timeout_seconds=240), timeout=250)
    assert done.done and not done.HasField("error"), done
    # A positive control for the path rules: the same file inside the root is accepted.
    inside = stub.SubmitTask(evolve_pb2.SubmitTaskRequest(
        spec=evolve_pb2.TaskSpec(name="inside", npz=evolve_pb2.NpzSource(path="inside.npz"))), timeout=TIMEOUT)
    stub.CancelOperation(evolve_pb2.CancelOperationRequest(name=inside.name), timeout=TIMEOUT)
    baseline = _predict(channel)
    rss_start = rss_mb(server.process.pid)

    # Targeted cases first: every kind of bad input, each with the codes it may get.
    counts: collections.Counter = collections.Counter()
    by_method: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    wrong = []
    for what, method, data, codes in targeted(files):
        code, error = call(channel, method, data)
        counts[code.name] += 1
        by_method[method.rsplit("/", 1)[1]][code.name] += 1
        if code not in codes:
            wrong.append((what, method, code.name, error.details() if error else ""))
        elif code == grpc.StatusCode.INVALID_ARGUMENT and not _field_violations(error):
            wrong.append((what, method, "INVALID_ARGUMENT without a BadRequest field violation", error.details()))
    targeted_counts = dict(counts)
    # The accepted bad-content submissions: each operation fails with a clear status.
    content = [op for op in stub.ListOperations(evolve_pb2.ListOperationsRequest(page_size=1000),
                                                timeout=TIMEOUT).operations if op.metadata.task.startswith("escape-")]
    assert len(content) == CONTENT_CASES, [op.metadata.task for op in content]
    for operation in content:
        operation = stub.WaitOperation(evolve_pb2.WaitOperationRequest(name=operation.name, timeout_seconds=120),
                                       timeout=130)
        assert operation.done and operation.metadata.state == evolve_pb2.OPERATION_STATE_FAILED, operation
        assert operation.error.code in (code_pb2.INVALID_ARGUMENT, code_pb2.FAILED_PRECONDITION), operation.error
        if operation.error.code == code_pb2.INVALID_ARGUMENT:
            bad = error_details_pb2.BadRequest()
            assert any(d.Unpack(bad) for d in operation.error.details if d.Is(bad.DESCRIPTOR)), operation.error
            assert bad.field_violations[0].field.startswith("spec."), bad
    rss_warm = rss_mb(server.process.pid)

    # Then random ones, several at a time.
    generator = Generator(files)
    requests = [generator.request() for _ in range(RANDOM_REQUESTS)]
    random_counts: collections.Counter = collections.Counter()
    per_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    forbidden = []
    loop_started = time.monotonic()
    with futures.ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(lambda r: call(channel, r[1], r[2]), requests))
    loop_seconds = time.monotonic() - loop_started
    for (kind, method, data), (code, error) in zip(requests, results):
        random_counts[code.name] += 1
        per_kind[kind][code.name] += 1
        by_method[method.rsplit("/", 1)[1]][code.name] += 1
        if code in FORBIDDEN or code == grpc.StatusCode.UNAVAILABLE:
            forbidden.append((kind, method, data[:80].hex(), code.name, error.details() if error else ""))
    rss_after = rss_mb(server.process.pid)

    # Quiesce: cancel the searches valid requests started, then replay the rejected requests.
    operations = stub.ListOperations(evolve_pb2.ListOperationsRequest(page_size=1000), timeout=TIMEOUT).operations
    for operation in operations:
        if not operation.done:
            stub.CancelOperation(evolve_pb2.CancelOperationRequest(name=operation.name), timeout=TIMEOUT)
    for operation in operations:
        waited = stub.WaitOperation(evolve_pb2.WaitOperationRequest(name=operation.name, timeout_seconds=120),
                                    timeout=130)
        assert waited.done, waited
    rss_quiet = rss_mb(server.process.pid)
    mutating = (EVOLVE + "SubmitTask", EVOLVE + "Improve", EVOLVE + "CancelOperation", EVOLVE + "DeleteOperation",
                LRO + "CancelOperation", LRO + "DeleteOperation")
    replay = [
        (kind, method, data) for (kind, method, data), (code, _) in zip(requests, results)
        if code.name in REJECTED and (method not in mutating or code == grpc.StatusCode.INVALID_ARGUMENT)
    ]
    rss_replays = []
    replay_counts: collections.Counter = collections.Counter()
    with futures.ThreadPoolExecutor(THREADS) as pool:
        for _ in range(REPLAYS):
            answers = pool.map(lambda r: call(channel, r[1], r[2]), replay)
            for (kind, method, data), (code, error) in zip(replay, answers):
                replay_counts[code.name] += 1
                if code in FORBIDDEN or code == grpc.StatusCode.UNAVAILABLE:
                    forbidden.append((kind, method, data[:80].hex(), code.name, error.details() if error else ""))
            rss_replays.append(rss_mb(server.process.pid))
    operations = stub.ListOperations(evolve_pb2.ListOperationsRequest(page_size=1000), timeout=TIMEOUT).operations
    assert all(op.done for op in operations), "a replayed rejected request started work"

    # The server is up, healthy, and serves the same model as before.
    assert server.process.poll() is None, "the server died"
    live = infer_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(infer_pb2.ServerLiveRequest(), timeout=10)
    assert live.live
    assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
    version, probabilities = _predict(channel)
    if version == baseline[0]:  # a fuzzed Improve may have replaced the path (a new version)
        assert probabilities == baseline[1]
    log = server.log()
    valid = random_counts["OK"]
    watch_open = by_method["WatchEvolution"]["DEADLINE_EXCEEDED"]
    report = {
        "seed": SEED,
        "requests": sum(counts.values()) + sum(random_counts.values()) + sum(replay_counts.values()),
        "targeted": sum(counts.values()),
        "random": sum(random_counts.values()),
        "targeted_counts": targeted_counts,
        "random_counts": dict(random_counts),
        "random_counts_by_kind": {k: dict(v) for k, v in per_kind.items()},
        "counts_by_method": {k: dict(v) for k, v in sorted(by_method.items())},
        "valid_random_requests": valid,
        "watch_streams_open_until_deadline": watch_open,
        "replayed": len(replay) * REPLAYS,
        "replay_counts": dict(replay_counts),
        "rss_mb": {
            "start": round(rss_start), "after_targeted": round(rss_warm),
            "after_random_with_searches": round(rss_after), "idle": round(rss_quiet),
            "after_replays": [round(r) for r in rss_replays],
        },
        "random_loop_seconds": round(loop_seconds, 1),
        "total_seconds": round(time.monotonic() - started, 1),
        "unexpected_errors_logged": log.count("failed unexpectedly"),
    }
    print(json.dumps(report, indent=1))
    (tmp_path / "fuzz_report.json").write_text(json.dumps(report, indent=1))
    record_property("fuzz_report", json.dumps(report))
    channel.close()

    assert report["requests"] - report["replayed"] >= 1000
    assert not wrong, "targeted requests got the wrong status:\n" + "\n".join(map(str, wrong))
    assert not forbidden, "UNKNOWN / INTERNAL / UNAVAILABLE answers:\n" + "\n".join(map(str, forbidden[:20]))
    assert "failed unexpectedly" not in log, log[-6000:]
    assert valid <= OK_SHARE * RANDOM_REQUESTS, f"{valid} random requests were valid: the fuzzer is too tame"
    assert max(rss_replays) - rss_quiet < MAX_RSS_GROWTH_MB, report["rss_mb"]
    assert server.stop() == 0
