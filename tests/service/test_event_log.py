"""The event log's saved form: every event kind survives a round trip exactly,
what is saved is bounded per task and in all, and a restore keeps sequence
numbers while new events continue after the saved position (or the unclean
shutdown gap)."""

from __future__ import annotations

import base64
import json
import math
import zlib

import pytest

from evolve import events as ev
from evolve.search.budget import SearchPlan
from evolve.types import ParentProbe
from service import event_log
from service.event_log import EventLog, decode_events, encode_events, newest_per_task
from service.jobs import UNCLEAN_SEQUENCE_GAP, event_log_start

PLAN = SearchPlan("extension", 4, 2, 6, 4096, 32, 3600, 400)
PROBES = (ParentProbe("p1", "digits", 0.93, 0.4, 1, "best probe"), ParentProbe("p0", "", 0.1, 0.2))


def every_kind(task: str = "digits") -> list[ev.Event]:
    """One event of every kind, with the awkward values (NaN, -inf, tuples, nesting)."""
    return [
        ev.SearchStarted(task, PLAN, PROBES),
        ev.GenerationStarted(task, 0, 4, 2),
        ev.CandidateScored(task, "p7", "p1", "digits_parity", 0, float("-inf"), float("nan"), 1.5e5, 3.25e8,
                           ("share:encoderblock_0", "hparam:learning_rate=0.01"), True, 12.5, 3.0,
                           (("_mu_", 0.1), ("_mu_|clone:head", 0.04))),
        ev.CandidateAccepted(task, "p7", 0.91, 0.92),
        ev.CheckpointWritten(task, 3, "/var/lib/evolve", 2),
        ev.SearchFinished(task, "p7", 0.91, 0.92, 0.9, "SUCCEEDED", "done"),
    ]


def same(a: ev.Event, b: ev.Event) -> bool:
    """Equality that counts NaN equal to NaN."""
    def norm(value):
        return "nan" if isinstance(value, float) and math.isnan(value) else value
    fields = [f for f in type(a).__dataclass_fields__]
    return type(a) is type(b) and all(norm(getattr(a, f)) == norm(getattr(b, f)) for f in fields)


def test_every_event_kind_round_trips_exactly():
    log = EventLog()
    for i, event in enumerate(every_kind()):
        log.append(event, f"operations/{i}")
    original, _ = log.read(0)
    restored = decode_events(encode_events(original))
    assert [(e.sequence, e.time, e.operation) for e in restored] == [(e.sequence, e.time, e.operation)
                                                                      for e in original]
    for before, after in zip(original, restored):
        assert same(before.event, after.event), (before.event, after.event)
    started = restored[0].event
    assert isinstance(started.plan, SearchPlan) and started.plan == PLAN
    assert started.probes == PROBES and isinstance(started.probes, tuple)
    assert isinstance(restored[2].event.mutations, tuple)


def test_saved_form_is_compact_json_of_the_dataclasses():
    log = EventLog()
    for _ in range(50):
        for event in every_kind():
            log.append(event, "operations/1")
    last, data = log.saved_state(per_task=1000, total=1000)
    assert last == 300
    saved = json.loads(zlib.decompress(base64.b64decode(data)))
    assert saved["format"] == event_log.SAVED_FORMAT
    sequence, _, operation, first = saved["events"][0]
    assert (sequence, operation, first["type"], first["plan"]["generations"]) == (1, "operations/1", "SearchStarted", 4)
    assert len(data) / 300 < 150, "the manifest is rewritten on every save: keep events small"
    _, bounded = log.saved_state()  # the defaults: one task's newest SAVED_PER_TASK
    assert [e.sequence for e in decode_events(bounded)] == list(range(301 - event_log.SAVED_PER_TASK, 301))


def test_saved_events_are_bounded_per_task_and_in_all():
    log = EventLog()
    for i in range(30):
        log.append(ev.GenerationStarted("busy", i, 30, 2))
    for i in range(3):
        log.append(ev.GenerationStarted("quiet", i, 3, 2))
    for i in range(30, 40):
        log.append(ev.GenerationStarted("busy", i, 40, 2))
    _, data = log.saved_state(per_task=10, total=1000)
    kept = decode_events(data)
    busy = [e.event.generation for e in kept if e.task == "busy"]
    assert busy == list(range(30, 40)), "the newest events of a busy task, oldest first"
    assert [e.event.generation for e in kept if e.task == "quiet"] == [0, 1, 2], "a quiet task keeps its history"
    assert [e.sequence for e in kept] == sorted(e.sequence for e in kept)

    _, data = log.saved_state(per_task=100, total=5)
    assert [e.sequence for e in decode_events(data)] == [39, 40, 41, 42, 43], "the global cap keeps the newest"


def test_newest_per_task_keeps_order():
    log = EventLog()
    for i in range(6):
        log.append(ev.GenerationStarted("ab"[i % 2], i, 6, 2))
    events, _ = log.read(0)
    assert [e.sequence for e in newest_per_task(events, 2, 10)] == [3, 4, 5, 6]
    assert [e.sequence for e in newest_per_task(events, 2, 3)] == [4, 5, 6]


@pytest.mark.parametrize("clean", [True, False])
def test_restore_keeps_numbers_and_continues_after_the_saved_position(clean):
    before = EventLog()
    for event in every_kind():
        before.append(event, "operations/1")
    last, data = before.saved_state()
    extra = {"event_sequence": last, "events": data, "clean_shutdown": clean}

    after = EventLog(start_sequence=event_log_start(extra))
    assert after.restore(extra["events"]) == len(every_kind())
    replayed, cursor = after.read(0)
    assert [e.sequence for e in replayed] == [1, 2, 3, 4, 5, 6]
    assert [type(e.event) for e in replayed] == [type(e) for e in every_kind()]
    assert cursor == (last if clean else last + UNCLEAN_SEQUENCE_GAP)
    new = after.append(ev.GenerationStarted("digits", 1, 4, 2), "operations/2")
    assert new.sequence == cursor + 1
    assert [e.sequence for e in after.read(0)[0]][-2:] == [6, new.sequence]
    assert [e.sequence for e in after.read(0, task="digits")[0]][-1] == new.sequence
    assert after.read(5)[0][0].sequence == 6, "resuming from a restored sequence works"


def test_restore_respects_retention_and_live_events():
    before = EventLog()
    for i in range(20):
        before.append(ev.GenerationStarted("t", i, 20, 2))
    _, data = before.saved_state()
    after = EventLog(start_sequence=20, retention=5)
    live = after.append(ev.GenerationStarted("t", 0, 1, 1))
    after.restore(data)
    assert [e.sequence for e in after.read(0)[0]] == [17, 18, 19, 20, live.sequence]


def test_unreadable_or_unknown_saved_events_never_stop_a_restore(caplog):
    log = EventLog(start_sequence=7)
    assert log.restore("not base64 at all!") == 0
    assert log.restore(base64.b64encode(zlib.compress(b"[1, 2]")).decode()) == 0
    assert log.restore(None) == 0 and log.last_sequence == 7

    rows = [[1, 1.0, "", {"type": "FromTheFuture", "task": "t"}],
            [2, 2.0, "", {"type": "GenerationStarted", "task": "t", "generation": 0, "generations": 1,
                          "candidates": 2, "added_later": "ignored"}],
            [3, "broken"]]
    text = json.dumps({"format": event_log.SAVED_FORMAT, "events": rows})
    assert log.restore(base64.b64encode(zlib.compress(text.encode())).decode()) == 1
    (kept,), _ = log.read(0)
    assert kept.sequence == 2 and kept.event == ev.GenerationStarted("t", 0, 1, 2)
    assert "skipped" in caplog.text


def test_saved_state_reuses_each_event_encoding():
    log = EventLog()
    for event in every_kind():
        log.append(event)
    first = log.saved_state()
    log.append(ev.GenerationStarted("digits", 1, 4, 2))
    second = log.saved_state()
    assert second[0] == first[0] + 1
    assert [e.sequence for e in decode_events(second[1])] == list(range(1, 8))


def test_jobs_save_the_events_with_every_checkpoint_and_restore_them():
    """Through the job queue: an operation's events are in the checkpoint it
    writes when it ends, and a restored queue replays them (same numbers)."""
    from evolve.types import BundledSource, TaskSpec
    from service import jobs as jobs_lib
    from tests.service.test_server_units import FakeEngine

    engine = FakeEngine()
    log = EventLog()
    queue = jobs_lib.Jobs(engine, log, max_queue=4)
    engine.extra_state = queue.extra_state
    record = queue.submit(TaskSpec("a", BundledSource("digits")))
    engine.release.set()
    queue.start()
    assert queue.wait(record.name, timeout=10).state == "SUCCEEDED"
    queue.shutdown(timeout=5)
    extra = engine.saved[-1]  # the operation's final checkpoint
    streamed, _ = log.read(0)
    assert [type(e.event).__name__ for e in streamed] == ["GenerationStarted", "CandidateScored", "CandidateAccepted"]
    assert extra["event_sequence"] == streamed[-1].sequence

    restored_log = EventLog(start_sequence=event_log_start(extra))
    jobs_lib.Jobs(FakeEngine(), restored_log).restore(extra)
    replayed, _ = restored_log.read(0)
    assert [(e.sequence, e.time, e.operation, e.event) for e in replayed] == [
        (e.sequence, e.time, e.operation, e.event) for e in streamed
    ]


def test_progress_events_round_trip_and_never_push_a_search_out_of_the_saved_history():
    progress = ev.TrainingProgress("digits", 1, 4, 2, 37, 120, 1234.5)
    restored = decode_events(encode_events([event_log.LoggedEvent(1, 2.5, "operations/1", progress)]))
    assert restored[0].event == progress and restored[0].sequence == 1
    log = EventLog()
    for generation in range(10):  # a long search: many more progress reports than candidates
        log.append(ev.GenerationStarted("digits", generation, 10, 2), "operations/1")
        for step in range(30):
            log.append(ev.TrainingProgress("digits", generation, 10, 2, step + 1, 30, 100.0), "operations/1")
    _, data = log.saved_state(per_task=10, total=100)
    saved = decode_events(data)
    kinds = [type(e.event) for e in saved]
    assert kinds.count(ev.GenerationStarted) == 10, "the bounded history keeps every generation"
    assert kinds.count(ev.TrainingProgress) == event_log.SAVED_TRANSIENT_PER_TASK
    newest = [e.sequence for e in log.read(0)[0] if isinstance(e.event, ev.TrainingProgress)]
    assert [e.sequence for e in saved if isinstance(e.event, ev.TrainingProgress)] == newest[-20:]
    assert [e.sequence for e in saved] == sorted(e.sequence for e in saved)
