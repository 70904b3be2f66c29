"""The evolve gRPC server: `python -m service.server` or `evolve serve`.

Starts listening at once with health NOT_SERVING, restores the system from
the state directory (or creates one) in the background, then reports
SERVING. SIGTERM / SIGINT drain it: no new calls, the running search stops at
its next step and is queued again for the next start, a final checkpoint is
written, and the process exits 0.

Every flag has an EVOLVE_* environment variable (flags win). Prefer the
environment (or a secret mounted into it) for tokens: flags show in `ps`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
from concurrent import futures
from typing import Any, Mapping, Sequence

from evolve.config import SERVING_EXECUTABLES, SERVING_MAX_YIELD_SECONDS, TRAINING_EXECUTABLES

logger = logging.getLogger("service.server")

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
EVOLUTION_SERVICE = "evolve.v1.EvolutionService"
INFERENCE_SERVICE = "inference.GRPCInferenceService"
LONGRUNNING_SERVICE = "google.longrunning.Operations"
# What a drain allows the final checkpoint on top of the grace periods.
FINAL_CHECKPOINT_SECONDS = 60.0


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8500
    state_dir: str = "./state"
    config: str = "tiny"
    overrides: tuple[str, ...] = ()  # "key=value" overrides of the configuration
    root: str = ""  # a ViT size name ("tiny", "B/16") or a vit_jax .npz; "": the configuration's size
    devices: int = 0  # 0: every local device
    token: str | None = None  # with a token, every RPC but the probes needs one (service/auth.py)
    read_token: str | None = None
    open_reads: bool = False  # with a token: read calls open, mutating calls still need it
    tls_cert: str | None = None
    tls_key: str | None = None
    data_roots: tuple[str, ...] = ()  # empty: any path
    max_queue: int = 16
    cycle_idle_seconds: float = 0.0  # > 0: idle round-robin generalization searches
    max_batch: int = 1024
    max_message_mb: int = 64
    max_train_examples: int | None = None
    seed: int = 0
    grace_seconds: float = 30.0
    workers: int = 32
    compilation_cache_dir: str | None = None  # None: <state_dir>/xla_cache; "": off
    compilation_cache_mb: int = 2048  # least recently used entries are evicted beyond it; 0: no bound
    # Compiled executables kept in memory, least recently used evicted: train + eval steps, predict.
    max_compiled_steps: int = TRAINING_EXECUTABLES
    max_compiled_predicts: int = SERVING_EXECUTABLES
    serving_max_yield_ms: float = SERVING_MAX_YIELD_SECONDS * 1000  # a search's wait per step for Predict; 0: none
    predict_batch_window_ms: float = 0.0  # concurrent Predicts of a task batched (evolve.batching); < 0: off
    predict_instances: int = 1  # Predict device calls of one task at once before calls queue and batch
    port_file: str | None = None
    log_level: str = "INFO"
    startup_delay_seconds: float = 0.0  # for tests of the NOT_SERVING phase
    min_free_mb: int = 256  # new work is refused while the state disk has less free
    max_waits_per_client: int = 0  # WaitOperation + WatchEvolution per client host; 0: workers / 4
    max_data_mb: int = 4096  # decoded size one task source may have
    allow_download: bool = False  # tfds sources may download and prepare datasets
    metrics_port: int | None = None  # Prometheus /metrics over HTTP; None: off, 0: a free port
    metrics_host: str = ""  # "": the gRPC --host
    metrics_port_file: str | None = None
    log_format: str = "text"  # or "json": one JSON object per line
    # A serving replica: serves what another server commits under state_dir,
    # catching up every follow_seconds; takes no lock and never writes there.
    read_only: bool = False
    follow_seconds: float = 2.0


# ---- flags ---------------------------------------------------------------------------


def _env(name: str, default: Any = None) -> Any:
    return os.environ.get(f"EVOLVE_{name}", default)


def _env_list(name: str) -> list[str]:
    value = _env(name, "")
    return [part for part in value.split(os.pathsep) if part]


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the server's flags (each defaulting to its EVOLVE_* variable)."""
    defaults = ServerOptions()
    add = parser.add_argument
    add("--host", default=_env("HOST", defaults.host),
        help="address to listen on; anything beyond localhost needs --token [EVOLVE_HOST, %(default)s]")
    add("--port", type=int, default=int(_env("PORT", defaults.port)),
        help="port to listen on; 0 picks a free one [EVOLVE_PORT, %(default)s]")
    add("--state-dir", default=_env("STATE_DIR", defaults.state_dir),
        help="checkpoints, operations and the compilation cache [EVOLVE_STATE_DIR, %(default)s]")
    add("--config", default=_env("CONFIG", defaults.config),
        help="named search configuration: tiny, Ti/16, S/16, B/16, L/16 [EVOLVE_CONFIG, %(default)s]")
    add("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a configuration field for a new system (JSON value), e.g. generations=2 or "
             "size.hidden_size=32; repeatable")
    add("--root", default=_env("ROOT", defaults.root),
        help="root model of a new system: a ViT size name (random init) or a vit_jax .npz file "
             "[EVOLVE_ROOT, default: the configuration's size]")
    add("--devices", type=int, default=int(_env("DEVICES", defaults.devices)),
        help="accelerators to train on; on CPU, N > 1 simulates N devices; 0: all [EVOLVE_DEVICES]")
    add("--token", default=_env("TOKEN"),
        help="bearer token; once set, every call except grpc health and ServerLive/ServerReady needs a token "
             "(this one; reads also take --read-token); an empty token is an error [EVOLVE_TOKEN]")
    add("--token-file", default=_env("TOKEN_FILE"),
        help="read the token from this file instead (e.g. a mounted Secret; surrounding whitespace is "
             "dropped, an empty file is an error) [EVOLVE_TOKEN_FILE]")
    add("--read-token", default=_env("READ_TOKEN"),
        help="second bearer token that allows read calls only (predictions, Get/List/Watch/Wait, reflection); "
             "mutating calls answer PERMISSION_DENIED; requires --token [EVOLVE_READ_TOKEN]")
    add("--read-token-file", default=_env("READ_TOKEN_FILE"),
        help="read the read token from this file instead [EVOLVE_READ_TOKEN_FILE]")
    add("--open-reads", action=argparse.BooleanOptionalAction, default=_env("OPEN_READS"),
        help="with --token, leave read calls open to anyone (predictions, task lists and specs with their "
             "server-side paths); mutating calls still need the token; excludes --read-token "
             "[EVOLVE_OPEN_READS=true|false, default false]")
    add("--tls-cert", default=_env("TLS_CERT"), help="PEM certificate chain; with --tls-key serves TLS [EVOLVE_TLS_CERT]")
    add("--tls-key", default=_env("TLS_KEY"), help="PEM private key [EVOLVE_TLS_KEY]")
    add("--data-root", dest="data_roots", action="append", default=None, metavar="DIR",
        help="allow task data only under DIR; repeatable; default: any path "
             "[EVOLVE_DATA_ROOTS, separated by %r]" % os.pathsep)
    add("--max-queue", type=int, default=int(_env("MAX_QUEUE", defaults.max_queue)),
        help="operations that may wait for the search worker [EVOLVE_MAX_QUEUE, %(default)s]")
    add("--cycle-idle-seconds", type=float, default=float(_env("CYCLE_IDLE_SECONDS", defaults.cycle_idle_seconds)),
        help="after this many idle seconds, run a generalization search of the next ready task, round-robin "
             "(DESIGN 3.7); 0 = off [EVOLVE_CYCLE_IDLE_SECONDS, %(default)s]")
    add("--max-batch", type=int, default=int(_env("MAX_BATCH", defaults.max_batch)),
        help="images per prediction call [EVOLVE_MAX_BATCH, %(default)s]")
    add("--max-message-mb", type=int, default=int(_env("MAX_MESSAGE_MB", defaults.max_message_mb)),
        help="largest request or response in MiB [EVOLVE_MAX_MESSAGE_MB, %(default)s]")
    add("--max-train-examples", type=int, default=_int_or_none(_env("MAX_TRAIN_EXAMPLES")),
        help="cap on the training examples a task loads [EVOLVE_MAX_TRAIN_EXAMPLES]")
    add("--seed", type=int, default=int(_env("SEED", defaults.seed)), help="[EVOLVE_SEED, %(default)s]")
    add("--grace-seconds", type=float, default=float(_env("GRACE_SECONDS", defaults.grace_seconds)),
        help="how long in-flight calls may finish on shutdown [EVOLVE_GRACE_SECONDS, %(default)s]")
    add("--workers", type=int, default=int(_env("WORKERS", defaults.workers)),
        help="threads serving calls; half of them at most follow WatchEvolution [EVOLVE_WORKERS, %(default)s]")
    add("--compilation-cache-dir", default=_env("COMPILATION_CACHE_DIR"),
        help="JAX persistent compilation cache; '' turns it off "
             "[EVOLVE_COMPILATION_CACHE_DIR, default: STATE_DIR/xla_cache]")
    add("--compilation-cache-mb", type=int,
        default=int(_env("COMPILATION_CACHE_MB", defaults.compilation_cache_mb)),
        help="bound of the compilation cache in MiB: JAX evicts the least recently used programs beyond it; "
             "0: no bound [EVOLVE_COMPILATION_CACHE_MB, %(default)s]")
    add("--max-compiled-steps", type=int, default=int(_env("MAX_COMPILED_STEPS", defaults.max_compiled_steps)),
        help="compiled train and eval steps kept in memory, the least recently used evicted beyond it; at least "
             "twice the candidates of a generation [EVOLVE_MAX_COMPILED_STEPS, %(default)s]")
    add("--max-compiled-predicts", type=int,
        default=int(_env("MAX_COMPILED_PREDICTS", defaults.max_compiled_predicts)),
        help="compiled predict programs (one per served structure and batch bucket) kept in memory, the least "
             "recently used evicted beyond it [EVOLVE_MAX_COMPILED_PREDICTS, %(default)s]")
    add("--serving-max-yield-ms", type=float,
        default=float(_env("SERVING_MAX_YIELD_MS", defaults.serving_max_yield_ms)),
        help="Predict before training: while a Predict call is in flight, a running search waits before its "
             "next step, at most this long per step (so it slows under constant traffic, never stops); 0: "
             "searches never wait [EVOLVE_SERVING_MAX_YIELD_MS, %(default)s]")
    add("--predict-batch-window-ms", type=float,
        default=float(_env("PREDICT_BATCH_WINDOW_MS", defaults.predict_batch_window_ms)),
        help="Predict calls for one task that arrive while its previous call runs are run as one batch; with a "
             "window > 0 a call also waits this long for others to join; negative: every call runs alone "
             "[EVOLVE_PREDICT_BATCH_WINDOW_MS, %(default)s]")
    add("--predict-instances", type=int, default=int(_env("PREDICT_INSTANCES", defaults.predict_instances)),
        help="Predict calls of one task that run at once; further calls queue and run as one batch "
             "[EVOLVE_PREDICT_INSTANCES, %(default)s]")
    add("--port-file", default=_env("PORT_FILE"),
        help="write the bound port to this file once listening (for supervisors and tests)")
    add("--log-level", default=_env("LOG_LEVEL", defaults.log_level), help="[EVOLVE_LOG_LEVEL, %(default)s]")
    add("--log-format", choices=("text", "json"), default=_env("LOG_FORMAT", defaults.log_format),
        help="text lines, or one JSON object per line (time, level, logger, message, request_id); each RPC "
             "writes one access line (logger evolve.access) [EVOLVE_LOG_FORMAT, %(default)s]")
    add("--metrics-port", type=int, default=_int_or_none(_env("METRICS_PORT")),
        help="serve Prometheus metrics over plain HTTP at /metrics on this port (no authentication); "
             "0 picks a free one; default: no metrics endpoint [EVOLVE_METRICS_PORT]")
    add("--metrics-host", default=_env("METRICS_HOST", defaults.metrics_host),
        help="address of the metrics endpoint [EVOLVE_METRICS_HOST, default: --host]")
    add("--metrics-port-file", default=_env("METRICS_PORT_FILE"),
        help="write the metrics port to this file once listening [EVOLVE_METRICS_PORT_FILE]")
    add("--max-waits-per-client", type=int, default=int(_env("MAX_WAITS_PER_CLIENT", defaults.max_waits_per_client)),
        help="WaitOperation and WatchEvolution calls one client host may hold at once; all clients together "
             "hold at most --workers / 2, so Predict and health always find a thread; 0: --workers / 4 "
             "[EVOLVE_MAX_WAITS_PER_CLIENT, %(default)s]")
    add("--max-data-mb", type=int, default=int(_env("MAX_DATA_MB", defaults.max_data_mb)),
        help="largest decoded size of one task's data (npz arrays, image folders, tfds images as uint8 RGB); "
             "checked from headers before decoding [EVOLVE_MAX_DATA_MB, %(default)s]")
    add("--allow-download", action=argparse.BooleanOptionalAction,
        default=_env("ALLOW_DOWNLOAD", "").lower() in ("1", "true", "yes"),
        help="let tfds sources download and prepare datasets that are not prepared yet (in the task's "
             "operation, bounded by --max-data-mb and --min-free-mb); off: such a task fails at once "
             "[EVOLVE_ALLOW_DOWNLOAD, off]")
    add("--min-free-mb", type=int, default=int(_env("MIN_FREE_MB", defaults.min_free_mb)),
        help="refuse new tasks and improvements (RESOURCE_EXHAUSTED) while the state disk has less than this "
             "free; 0 = no reserve [EVOLVE_MIN_FREE_MB, %(default)s]")
    add("--read-only", action=argparse.BooleanOptionalAction, default=_env("READ_ONLY"),
        help="serve a state directory that another server writes (a serving replica): Predict, ModelInfer, "
             "GetTask, ListTasks and GetSystem answer from its latest committed checkpoint, newer ones are "
             "loaded as they commit, and every change answers FAILED_PRECONDITION; takes no lock, writes "
             "nothing there, and uses no compilation cache unless --compilation-cache-dir names one "
             "[EVOLVE_READ_ONLY=true|false, default false]")
    add("--follow-seconds", type=float, default=float(_env("FOLLOW_SECONDS", defaults.follow_seconds)),
        help="with --read-only: how often to look for a newer committed checkpoint "
             "[EVOLVE_FOLLOW_SECONDS, %(default)s]")
    add("--startup-delay-seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    return parser


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"", "0", "false", "no", "off"})


def _boolean(flag: str, value: bool | str | None) -> bool:
    """A flag's boolean: the flag itself, or its EVOLVE_* value (true/false, 1/0, yes/no, on/off)."""
    if value is None or isinstance(value, bool):
        return bool(value)
    word = value.strip().lower()
    if word not in _TRUE_WORDS | _FALSE_WORDS:
        raise ValueError(f"{flag} must be true or false, got {value!r}")
    return word in _TRUE_WORDS


def _read_secret_file(flag: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{flag}: cannot read {path!r}: {error}") from error


def _token_from(args: argparse.Namespace, name: str) -> str | None:
    """--NAME or the content of --NAME-file (not both), checked: an empty token is an error, never 'no auth'."""
    from service.auth import check_token

    flag, variable = f"--{name.replace('_', '-')}", f"EVOLVE_{name.upper()}"
    value, path = getattr(args, name, None), getattr(args, f"{name}_file", None)
    if value is not None and path is not None:
        raise ValueError(f"give {flag} or {flag}-file ({variable} or {variable}_FILE), not both")
    if path is not None:
        return check_token(f"{flag}-file {path!r}", _read_secret_file(f"{flag}-file", path))
    return check_token(f"{flag} ({variable})", value)


def options_from_args(args: argparse.Namespace) -> ServerOptions:
    """ServerOptions of parsed flags; raises ValueError on inconsistent ones."""
    data_roots = args.data_roots if args.data_roots is not None else _env_list("DATA_ROOTS")
    options = ServerOptions(
        host=args.host, port=args.port, state_dir=args.state_dir, config=args.config,
        overrides=tuple(args.overrides), root=args.root or "", devices=args.devices,
        token=_token_from(args, "token"), read_token=_token_from(args, "read_token"),
        open_reads=_boolean("--open-reads (EVOLVE_OPEN_READS)", getattr(args, "open_reads", None)),
        tls_cert=args.tls_cert or None, tls_key=args.tls_key or None,
        data_roots=tuple(os.path.abspath(root) for root in data_roots),
        max_queue=args.max_queue, cycle_idle_seconds=args.cycle_idle_seconds, max_batch=args.max_batch, max_message_mb=args.max_message_mb,
        max_train_examples=args.max_train_examples, seed=args.seed, grace_seconds=args.grace_seconds,
        workers=args.workers, compilation_cache_dir=args.compilation_cache_dir,
        compilation_cache_mb=args.compilation_cache_mb, port_file=args.port_file,
        max_compiled_steps=args.max_compiled_steps, max_compiled_predicts=args.max_compiled_predicts,
        serving_max_yield_ms=args.serving_max_yield_ms, predict_batch_window_ms=args.predict_batch_window_ms,
        predict_instances=args.predict_instances,
        log_level=args.log_level,
        startup_delay_seconds=args.startup_delay_seconds, min_free_mb=args.min_free_mb,
        max_waits_per_client=args.max_waits_per_client, max_data_mb=args.max_data_mb,
        allow_download=bool(args.allow_download),
        metrics_port=args.metrics_port, metrics_host=args.metrics_host or "",
        metrics_port_file=args.metrics_port_file or None, log_format=args.log_format,
        read_only=_boolean("--read-only (EVOLVE_READ_ONLY)", getattr(args, "read_only", None)),
        follow_seconds=args.follow_seconds,
    )
    validate_options(options)
    return options


def validate_options(options: ServerOptions) -> None:
    if not 0 <= options.port <= 65535:
        raise ValueError(f"--port must be 0..65535, got {options.port}")
    if options.metrics_port is not None and not 0 <= options.metrics_port <= 65535:
        raise ValueError(f"--metrics-port must be 0..65535, got {options.metrics_port}")
    if options.metrics_port and options.metrics_port == options.port:
        raise ValueError("--metrics-port must differ from --port")
    if options.log_format not in ("text", "json"):
        raise ValueError(f"--log-format must be text or json, got {options.log_format!r}")
    for name in ("max_queue", "max_batch", "max_message_mb", "workers", "max_compiled_steps", "max_compiled_predicts",
                 "predict_instances"):
        if getattr(options, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if options.max_data_mb < 1:
        raise ValueError("--max-data-mb must be at least 1")
    if options.max_waits_per_client < 0:
        raise ValueError("--max-waits-per-client must not be negative")
    if options.min_free_mb < 0:
        raise ValueError("--min-free-mb must not be negative")
    if not options.serving_max_yield_ms >= 0:
        raise ValueError("--serving-max-yield-ms must not be negative")
    if math.isnan(options.predict_batch_window_ms):
        raise ValueError("--predict-batch-window-ms must be a number")
    if options.compilation_cache_mb < 0:
        raise ValueError("--compilation-cache-mb must not be negative")
    if not options.follow_seconds > 0:
        raise ValueError("--follow-seconds must be positive")
    if options.devices < 0:
        raise ValueError("--devices must not be negative")
    _validate_tokens(options)
    if bool(options.tls_cert) != bool(options.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    for path in (options.tls_cert, options.tls_key):
        if path and not os.path.isfile(path):
            raise ValueError(f"no such file: {path}")
    build_config(options.config, parse_overrides(options.overrides), options.root)


def _validate_tokens(options: ServerOptions) -> None:
    """Token settings that mean what they say: no empty token, no open door by accident."""
    from service.auth import check_token

    token = check_token("--token", options.token)
    read_token = check_token("--read-token", options.read_token)
    if read_token and not token:
        raise ValueError("--read-token needs --token as well (mutating calls would be open)")
    if options.open_reads and not token:
        raise ValueError("--open-reads needs --token (without a token every call is open anyway)")
    if options.open_reads and read_token:
        raise ValueError("--open-reads and --read-token exclude each other: reads are either open or need a token")
    if token and token == read_token:
        raise ValueError("--read-token must differ from --token")


# ---- configuration ------------------------------------------------------------------


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """{"generations": 2, "size.hidden_size": 32} from ["generations=2", ...]."""
    overrides = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw  # a bare string
        overrides[key.strip()] = tuple(value) if isinstance(value, list) else value
    return overrides


def build_config(name: str, overrides: Mapping[str, Any], root: str = "") -> tuple[Any, str | None]:
    """The search configuration of a new system and the root .npz, if any."""
    from evolve.config import VIT_SIZES, SearchConfig, get_config  # noqa: PLC0415 (no JAX)

    config = get_config(name)
    fields = {f.name for f in dataclasses.fields(SearchConfig)}
    size_fields = {f.name for f in dataclasses.fields(type(config.size))}
    changes, size_changes = {}, {}
    for key, value in overrides.items():
        if key.startswith("size.") and key[5:] in size_fields:
            size_changes[key[5:]] = value
        elif key in fields and key not in ("name", "size"):
            changes[key] = value
        elif key == "size" and value in VIT_SIZES:
            changes["size"] = VIT_SIZES[value]
        else:
            raise ValueError(f"--set {key}: not a field of the configuration")
    root_npz = None
    if root in VIT_SIZES:
        changes.setdefault("size", VIT_SIZES[root])
    elif root:
        if not os.path.isfile(root):
            raise ValueError(f"--root {root!r} is neither a ViT size ({', '.join(VIT_SIZES)}) nor a file")
        root_npz = os.path.abspath(root)
    config = dataclasses.replace(config, **changes)
    if size_changes:
        config = dataclasses.replace(config, size=dataclasses.replace(config.size, **size_changes))
    return config, root_npz


# ---- process setup -------------------------------------------------------------------


def configure_logging(level: str, log_format: str = "text") -> None:
    from service.observability import configure_logging as configure  # noqa: PLC0415

    configure(level, log_format)


def configure_devices(devices: int) -> None:
    """Simulates `devices` CPU devices; must run before JAX is imported."""
    if devices <= 1:
        return
    if "jax" in sys.modules:
        logger.warning("JAX was imported before the device count was set; --devices may not apply on CPU")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()


def warn_if_exposed(options: ServerOptions) -> None:
    """Logs who may call what; warns when that is anyone who can reach a non-local port."""
    from service.auth import describe

    logger.info("access: %s", describe(options.token, options.read_token, options.open_reads))
    if options.host in LOCAL_HOSTS:
        return
    if not options.token:
        logger.warning(
            "!!! LISTENING ON %s WITHOUT A TOKEN: anyone who can reach this port can submit, cancel and "
            "delete tasks, run searches, predict, and read task specs with their server-side data paths. "
            "Set --token or --token-file (EVOLVE_TOKEN, EVOLVE_TOKEN_FILE). !!!", options.host
        )
        return
    if options.open_reads:
        logger.warning(
            "listening on %s with --open-reads: anyone who can reach this port can predict, list tasks and "
            "read task specs with their server-side data paths; only mutating calls need the token", options.host
        )
    if not options.tls_cert:
        logger.warning("listening on %s without TLS: tokens travel in clear text; set --tls-cert/--tls-key",
                       options.host)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _write_port_file(path: str, port: int) -> None:
    from evolve.statedir import write_text_atomically  # noqa: PLC0415 (no JAX)

    write_text_atomically(path, f"{port}\n")


# ---- the server ------------------------------------------------------------------------


class Server:
    """One server process: the gRPC server, the loader and the drain."""

    def __init__(self, options: ServerOptions):
        import grpc  # noqa: PLC0415
        from grpc_health.v1 import health

        from service.servicers import Backend

        self.options = options
        waiting = max(options.workers // 2, 1)  # the other half stays free for Predict and health
        per_client = options.max_waits_per_client or max(waiting // 2, 1)
        self.backend = Backend(max_long_calls=waiting, max_long_calls_per_peer=per_client)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self._grpc = grpc
        self._stop = threading.Event()
        self._loader = threading.Thread(target=self._load_guarded, name="loader", daemon=True)
        self._load_failed = False
        self._signal_name = ""
        self.metrics = None
        if options.metrics_port is not None:
            from service.metrics import ServerMetrics

            self.metrics = ServerMetrics(ready=lambda: self.backend.ready, max_queue=options.max_queue)
        self.server = self._build()
        self.port = self._bind()
        self.metrics_port = self._bind_metrics()

    def _build(self):
        from service.auth import AuthInterceptor
        from service.errors import ErrorInterceptor
        from service.observability import ObservabilityInterceptor

        grpc, options = self._grpc, self.options
        limit = options.max_message_mb * 1024 * 1024
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="rpc"),
            # Outermost first: the access log and metrics see every call's final status, denials included.
            interceptors=[ObservabilityInterceptor(self.metrics),
                          AuthInterceptor(options.token, options.read_token, options.open_reads,
                                          read_only=options.read_only), ErrorInterceptor()],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
            ],
        )
        self._add_services(server)
        return server

    def _add_services(self, server) -> None:
        from google.longrunning import operations_pb2, operations_pb2_grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        from service.gen import reflection_pool
        from service.gen.evolve.v1 import evolve_pb2, evolve_pb2_grpc
        from service.gen.inference import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc
        from service.longrunning import OperationsServicer
        from service.servicers import EvolutionServicer, InferenceServicer

        evolve_pb2_grpc.add_EvolutionServiceServicer_to_server(EvolutionServicer(self.backend), server)
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.backend), server)
        operations_pb2_grpc.add_OperationsServicer_to_server(OperationsServicer(self.backend), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        for name in self.service_names():
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        pool = reflection_pool(evolve_pb2.DESCRIPTOR, grpc_predict_v2_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR,
                               operations_pb2.DESCRIPTOR)
        names = (EVOLUTION_SERVICE, INFERENCE_SERVICE, LONGRUNNING_SERVICE, health.SERVICE_NAME,
                 reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server, pool=pool)

    @staticmethod
    def service_names() -> tuple[str, ...]:
        """Health is reported for the server as a whole ("") and per service."""
        return ("", EVOLUTION_SERVICE, INFERENCE_SERVICE, LONGRUNNING_SERVICE)

    def _bind(self) -> int:
        options, grpc = self.options, self._grpc
        address = _address(options.host, options.port)
        if options.tls_cert:
            with open(options.tls_key, "rb") as key, open(options.tls_cert, "rb") as cert:
                credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
            port = self.server.add_secure_port(address, credentials)
        else:
            port = self.server.add_insecure_port(address)
        if not port:
            raise OSError(f"cannot listen on {address}")
        return port

    def _bind_metrics(self) -> int:
        """Starts the /metrics endpoint (before the gRPC server: a busy port fails the start)."""
        if self.metrics is None:
            return 0
        host = self.options.metrics_host or self.options.host
        try:
            return self.metrics.serve(host.strip("[]"), self.options.metrics_port)
        except OSError as error:
            raise OSError(f"cannot serve metrics on {_address(host, self.options.metrics_port)}: {error}") from error

    # ---- lifecycle ---------------------------------------------------------------------

    def run(self) -> int:
        """Serves until SIGTERM / SIGINT; returns the exit code."""
        # Before the port file says where we listen: whoever reads it may signal us at once.
        self._install_signal_handlers()
        self.server.start()
        logger.info("listening on %s (%s); loading the system from %s",
                    _address(self.options.host, self.port), "TLS" if self.options.tls_cert else "plaintext",
                    os.path.abspath(self.options.state_dir))
        if self.options.port_file:
            _write_port_file(self.options.port_file, self.port)
        if self.metrics is not None:
            logger.info("metrics on http://%s/metrics", _address(self.options.metrics_host or self.options.host,
                                                                 self.metrics_port))
            if self.options.metrics_port_file:
                _write_port_file(self.options.metrics_port_file, self.metrics_port)
        warn_if_exposed(self.options)
        self._loader.start()
        while not self._stop.wait(0.5):
            pass
        if self._signal_name:
            logger.info("%s: draining (a second signal exits at once)", self._signal_name)
        return self._drain()

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not on the main thread: SIGTERM / SIGINT will not drain the server")
            return
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self._on_signal)

    def _on_signal(self, number: int, frame: Any) -> None:
        # Only flag here: logging from a signal handler can deadlock.
        if self._stop.is_set():
            os.write(2, b"second signal: exiting without a final checkpoint\n")
            os._exit(1)
        self._signal_name = signal.Signals(number).name
        self._stop.set()

    def stop(self) -> None:
        """Asks a running server to drain, as SIGTERM does."""
        self._stop.set()

    def _load_guarded(self) -> None:
        try:
            self._load()
        except Exception:
            logger.exception("cannot load the system; shutting down")
            self._load_failed = True
            self._stop.set()

    def _load(self) -> None:
        from grpc_health.v1 import health_pb2

        if self._stop.wait(self.options.startup_delay_seconds):
            return
        loaded = load_backend(self.options, self._stop)
        if loaded is None:
            return  # stopped while a replica waited for a first checkpoint
        engine, jobs, events = loaded
        engine.warm_up(cancel=self._stop)  # "ready" means fast: served paths compiled first
        if self._stop.is_set():
            return
        self.backend.attach(engine, jobs, events)
        if self.metrics is not None:
            self.metrics.attach(engine, jobs, events)
        if self.options.read_only:
            threading.Thread(target=self._follow, args=(engine,), name="follow", daemon=True).start()
        else:
            jobs.start()
        for name in self.service_names():
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.backend.set_serving(True)  # ServerReady agrees with health
        logger.info("serving %d task(s) from checkpoint step %d on %d device(s): %s", len(engine.system.tasks),
                    engine.checkpoint_step, len(engine.devices), engine.devices[0].platform)

    def _follow(self, engine) -> None:
        """A replica's loop: loads each newer committed step of the state directory."""
        while not self._stop.wait(self.options.follow_seconds):
            try:
                engine.follow()
            except Exception:  # a step being written, a damaged file: the served step stays
                logger.exception("cannot load the newest checkpoint of %s; still serving step %d",
                                 self.options.state_dir, engine.checkpoint_step)

    def _drain(self) -> int:
        """Stops taking calls, stops the worker, writes the final checkpoint."""
        self.health.enter_graceful_shutdown()
        self.backend.drain()
        grace = self.options.grace_seconds
        worker_timeout = max(grace, 10.0)
        # New calls are refused from now on. Calls in flight keep going while
        # the worker stops and the final checkpoint is written (a stream then
        # still gets its last events); the grace period proper starts once
        # the streams have been told to end (the second stop shortens this one).
        stopped = self.server.stop(2 * grace + worker_timeout + FINAL_CHECKPOINT_SECONDS)
        self._loader.join(grace)
        loaded = self.backend.loaded
        code = 1 if self._load_failed else 0
        if loaded is not None and self.options.read_only:
            loaded.events.close()
        elif loaded is not None:
            loaded.jobs.shutdown(timeout=worker_timeout)
            try:
                # No CheckpointWritten event: the saved event position stays exact.
                step = loaded.engine.save(extra=loaded.jobs.extra_state(clean_shutdown=True))
                logger.info("final checkpoint: step %d", step)
            except Exception:
                logger.exception("the final checkpoint failed; the previous one stays")
                code = 1
            loaded.events.close()  # ends WatchEvolution streams after the last events
        self.server.stop(grace)
        stopped.wait()
        if self.metrics is not None:
            self.metrics.close()
        logger.info("stopped")
        return code


def load_backend(options: ServerOptions, stop: threading.Event | None = None):
    """Restores the engine from the state directory, or creates a new system.

    Returns (engine, jobs, event log), with the jobs' operations restored and
    saved with every checkpoint from now on. A read-only server (a replica)
    waits for the directory's first committed checkpoint instead, and
    returns None when `stop` is set meanwhile; its jobs never run.
    """
    import jax  # noqa: PLC0415 (after configure_devices)

    from evolve import statedir
    from evolve.engine import Engine, enable_compilation_cache
    from service.event_log import EventLog
    from service.jobs import Jobs, event_log_start

    state_dir = os.path.abspath(options.state_dir)
    if not options.read_only:
        os.makedirs(state_dir, exist_ok=True)
        statedir.remove_interrupted_writes(state_dir)  # we hold the state-directory lock
    cache = options.compilation_cache_dir
    if cache is None and not options.read_only:  # a replica must not write the writer's cache
        cache = os.path.join(state_dir, "xla_cache")
    if cache:
        enable_compilation_cache(cache, max_bytes=options.compilation_cache_mb * 2**20)
    devices = jax.local_devices()
    if options.devices:
        if options.devices > len(devices):
            raise ValueError(f"--devices {options.devices}: only {len(devices)} available")
        devices = devices[: options.devices]
    engine_options = _engine_options(options)
    if options.read_only:
        engine = _replica_engine(state_dir, devices, engine_options, options.follow_seconds, stop)
        if engine is None:
            return None
        events = EventLog(start_sequence=event_log_start(engine.restored_extra))
        return engine, Jobs(engine, events, max_queue=options.max_queue), events
    engine = Engine.restore(state_dir, devices=devices, options=engine_options)
    fresh = engine is None
    if fresh:
        config, root_npz = build_config(options.config, parse_overrides(options.overrides), options.root)
        logger.info("creating a new system: configuration %s, root %s", config.name, root_npz or config.size.name)
        engine = Engine.create(config, root_npz=root_npz, state_dir=state_dir, devices=devices,
                               options=engine_options)
    else:
        logger.info("restored checkpoint step %d (configuration %s)", engine.checkpoint_step,
                    engine.system.config.name)
    events = EventLog(start_sequence=event_log_start(engine.restored_extra))
    jobs = Jobs(engine, events, max_queue=options.max_queue, cycle_idle_seconds=options.cycle_idle_seconds)
    jobs.restore(engine.restored_extra)
    engine.extra_state = jobs.extra_state
    # After a clean stop the numbers continue where they were; a re-queued
    # search would number events before anything else saves, so mark the
    # checkpoint unclean first: a kill -9 then skips the gap instead of
    # handing out those numbers twice.
    requeued = any(not record.done for record in jobs.list())
    if fresh or (requeued and engine.restored_extra.get("clean_shutdown")):
        engine.save()
    return engine, jobs, events


def _replica_engine(state_dir: str, devices, engine_options, poll_seconds: float, stop: threading.Event | None):
    """A read-only engine of the newest committed checkpoint, once there is one."""
    from evolve.engine import Engine  # noqa: PLC0415

    waited = False
    while True:
        engine = Engine.restore(state_dir, read_only=True, devices=devices, options=engine_options)
        if engine is not None:
            logger.info("read-only replica of %s: checkpoint step %d (configuration %s)", state_dir,
                        engine.checkpoint_step, engine.system.config.name)
            return engine
        if not waited:
            logger.info("read-only replica: %s has no committed checkpoint yet; waiting for one", state_dir)
            waited = True
        if stop is None or stop.wait(poll_seconds):
            return None


def _engine_options(options: ServerOptions):
    from evolve.data import DataLimits  # noqa: PLC0415
    from evolve.engine import EngineOptions  # noqa: PLC0415

    return EngineOptions(
        data_roots=options.data_roots, max_predict_batch=options.max_batch,
        max_train_examples=options.max_train_examples, seed=options.seed, min_free_bytes=options.min_free_mb << 20,
        max_compiled_structures=options.max_compiled_steps, max_compiled_predicts=options.max_compiled_predicts,
        serving_max_yield_seconds=options.serving_max_yield_ms / 1000.0,
        predict_batch_window_seconds=(options.predict_batch_window_ms / 1000.0
                                      if options.predict_batch_window_ms >= 0 else None),
        predict_instances=options.predict_instances,
        data_limits=DataLimits(max_decompressed_bytes=options.max_data_mb << 20, allow_download=options.allow_download),
    )


def serve(options: ServerOptions) -> int:
    """Runs a server until it is told to stop; returns the process exit code."""
    from evolve.errors import StateDirLockedError  # noqa: PLC0415 (no JAX)
    from evolve.statedir import StateDirLock  # noqa: PLC0415

    configure_logging(options.log_level, options.log_format)
    configure_devices(options.devices)
    lock = None if options.read_only else StateDirLock(options.state_dir)  # replicas write nothing: no lock
    if lock is not None:
        try:
            holder = lock.acquire()  # held until the process exits, kill -9 included
        except (StateDirLockedError, OSError) as error:
            logger.error("cannot start the server: %s", error)
            return 1
        logger.info("state directory %s locked (pid %d)", lock.state_dir, holder.pid)
    from evolve.data import tfds_source  # noqa: PLC0415

    # Before any thread serves calls: importing tfds later would race them (see preload).
    logger.info("tensorflow_datasets %s", "imported" if tfds_source.preload() else "not installed: tfds sources off")
    try:
        server = Server(options)
    except (OSError, RuntimeError, ValueError) as error:
        logger.error("cannot start the server: %s", error)
        return 1
    try:
        return server.run()
    finally:
        if lock is not None:
            lock.release()


def serve_from_args(args: argparse.Namespace) -> int:
    """`evolve serve`: options from parsed flags, then serve(); returns the exit code."""
    try:
        options = options_from_args(args)
    except ValueError as error:
        configure_logging("INFO", args.log_format if args.log_format in ("text", "json") else "text")
        logger.error("%s", error)
        return 2
    return serve(options)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.server", description=__doc__.split("\n\n")[0])
    add_serve_arguments(parser)
    return serve_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
