"""`evolve report`: the real CLI against a real server, the page checked in a real browser.

The browser is Chromium in headless mode, driven over the DevTools protocol
on a pipe (`--remote-debugging-pipe`: JSON messages ending in a NUL byte,
commands on the child's fd 3, answers and events on its fd 4), so no
websocket library and no open port are needed. The driver records what the
page logs (console API calls, uncaught exceptions, the browser's own log:
CSP violations, failed loads) and every request the page makes, evaluates
one expression that reads the plots out of the DOM, and takes a screenshot.

Without a Chromium binary the browser tests skip, unless
EVOLVE_REQUIRE_BROWSER=1 (CI's .ci/run sets it): then they fail.
EVOLVE_CHROMIUM names the binary when it is not on PATH.
"""

from __future__ import annotations

import base64
import collections
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from xml.etree import ElementTree

import pytest

from evolve.types import ROOT_TASK
from service import client as client_lib
from service import report
from service.gen.evolve.v1 import evolve_pb2

ROOT = Path(__file__).resolve().parents[2]
# (task, bundled data, generations): two generations show the generation axis, two tasks the sharing graph.
TASKS = (("digits", "digits", 2), ("digits_again", "digits", 1))
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- a headless Chromium over the DevTools protocol --------------------------------------


def chromium_binary() -> str | None:
    named = os.environ.get("EVOLVE_CHROMIUM")
    if named:
        return shutil.which(named) or (named if os.access(named, os.X_OK) else None)
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


class DevToolsError(RuntimeError):
    pass


class Chromium:
    """One headless Chromium; `open(url)` gives a Page in a new tab."""

    def __init__(self, binary: str, profile_dir: Path, *, timeout: float = 60.0):
        self.timeout = timeout
        commands_read, commands_write = os.pipe()
        answers_read, answers_write = os.pipe()
        # Above 9, so that moving them to 3 and 4 in the child cannot overwrite one with the other.
        child_read = fcntl.fcntl(commands_read, fcntl.F_DUPFD, 10)
        child_write = fcntl.fcntl(answers_write, fcntl.F_DUPFD, 10)
        os.close(commands_read)
        os.close(answers_write)
        launcher = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
                    "os.close(int(sys.argv[1])); os.close(int(sys.argv[2])); os.execv(sys.argv[3], sys.argv[3:])")
        arguments = [
            binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
            f"--user-data-dir={profile_dir}", "--no-first-run", "--no-default-browser-check",
            "--disable-extensions", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
            "--window-size=1280,1000", "about:blank",
        ]
        self.log_path = profile_dir / "chromium.log"
        profile_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", launcher, str(child_read), str(child_write), *arguments],
                pass_fds=(child_read, child_write), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        os.close(child_read)
        os.close(child_write)
        self._commands = os.fdopen(commands_write, "wb", buffering=0)
        self._answers = os.fdopen(answers_read, "rb", buffering=0)
        self._condition = threading.Condition()
        self._responses: dict[int, dict] = {}
        self.events: list[dict] = []
        self._next_id = 0
        self._closed = False
        threading.Thread(target=self._read, name="chromium-devtools", daemon=True).start()
        self.call("Browser.getVersion")  # fails fast when the browser did not come up

    def _read(self) -> None:
        buffer = b""
        while True:
            chunk = self._answers.read(1 << 16)
            if not chunk:
                break
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            with self._condition:
                for raw in messages:
                    message = json.loads(raw)
                    if "id" in message:
                        self._responses[message["id"]] = message
                    else:
                        self.events.append(message)
                self._condition.notify_all()
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        with self._condition:
            self._next_id += 1
            identifier = self._next_id
        message = {"id": identifier, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._commands.write(json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        with self._condition:
            while identifier not in self._responses:
                if self._closed:
                    raise DevToolsError(f"the browser went away during {method}:\n{self.log()}")
                if not self._condition.wait(max(deadline - time.monotonic(), 0.0)):
                    raise DevToolsError(f"no answer to {method} within {self.timeout} s")
            response = self._responses.pop(identifier)
        if "error" in response:
            raise DevToolsError(f"{method}: {response['error']}")
        return response.get("result", {})

    def wait_event(self, method: str, session: str, start: int = 0) -> dict:
        """The first event `method` of `session` at index `start` or later of `events`."""
        deadline = time.monotonic() + self.timeout
        with self._condition:
            while True:
                for event in self.events[start:]:
                    if event.get("method") == method and event.get("sessionId") == session:
                        return event
                if self._closed or not self._condition.wait(max(deadline - time.monotonic(), 0.0)):
                    raise DevToolsError(f"no {method} within {self.timeout} s")

    def open(self, url: str) -> Page:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=session)
        with self._condition:
            start = len(self.events)
        navigation = self.call("Page.navigate", {"url": url}, session)
        if navigation.get("errorText"):
            raise DevToolsError(f"navigating to {url}: {navigation['errorText']}")
        self.wait_event("Page.loadEventFired", session, start)
        # A last round trip: whatever the page logged while loading has arrived before its answer.
        self.call("Runtime.evaluate", {"expression": "0"}, session)
        return Page(self, session, start)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (DevToolsError, OSError):
            pass
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._commands.close()


class Page:
    def __init__(self, browser: Chromium, session: str, first_event: int):
        self.browser, self.session, self.first_event = browser, session, first_event

    def _events(self) -> list[dict]:
        with self.browser._condition:  # pylint: disable=protected-access
            return [e for e in self.browser.events[self.first_event:] if e.get("sessionId") == self.session]

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and the browser's error and warning log entries."""
        found = []
        for event in self._events():
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert", "warning"):
                found.append(f"console.{params['type']}: {[a.get('value', a.get('description')) for a in params.get('args', [])]}")
            elif method == "Runtime.exceptionThrown":
                found.append(f"exception: {params['exceptionDetails'].get('text')}")
            elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
                entry = params["entry"]
                found.append(f"log {entry['level']} ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}")
        return found

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self._events() if e["method"] == "Network.requestWillBeSent"]

    def evaluate(self, expression: str):
        result = self.browser.call("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                                   self.session)
        if "exceptionDetails" in result:
            raise DevToolsError(f"evaluation failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path, *, max_height: int = 6000) -> Path:
        size = self.browser.call("Page.getLayoutMetrics", session=self.session)["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], max_height), "scale": 1}
        shot = self.browser.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                            "clip": clip}, self.session)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary = chromium_binary()
    if binary is None:
        reason = (f"no Chromium binary ({', '.join(BROWSERS)} or EVOLVE_CHROMIUM); install one with "
                  "`apt-get install chromium`")
        if os.environ.get("EVOLVE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"EVOLVE_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    running = Chromium(binary, tmp_path_factory.mktemp("chromium"))
    yield running
    running.close()


# What the page holds, read out of the rendered DOM (getBBox: where the browser drew it).
READ_PAGE = r"""(() => {
  const all = (selector, root) => Array.from((root || document).querySelectorAll(selector));
  const outside = (svg) => {
    if (!svg) return -1;
    const box = svg.viewBox.baseVal;
    return all('circle, rect, path, polyline', svg).filter(el => {
      const b = el.getBBox();
      return b.x < box.x - 1 || b.y < box.y - 1 || b.x + b.width > box.x + box.width + 1 ||
             b.y + b.height > box.y + box.height + 1;
    }).length;
  };
  const plot = (id) => {
    const svg = document.getElementById(id);
    if (!svg) return null;
    const shown = svg.getBoundingClientRect();
    return {width: shown.width, height: shown.height, outside: outside(svg),
            candidates: all('circle.candidate', svg).map(c => Number(c.dataset.value)),
            best: all('circle.candidate.best', svg).map(c => c.dataset.path),
            rates: all('circle.rate', svg).length,
            mu: all('circle.mu', svg).map(c => [c.dataset.kind, Number(c.dataset.generation), Number(c.dataset.value)])};
  };
  const tasks = {};
  for (const section of all('section.task')) {
    const task = section.dataset.task;
    const lineage = document.getElementById('lineage-' + task);
    tasks[task] = {score: plot('score-' + task), accuracy: plot('accuracy-' + task),
                   rates: plot('mutation-rates-' + task), learnedMu: plot('learned-mu-' + task),
                   lineage: plot('lineage-' + task),
                   steps: lineage ? all('g.lineage-node', lineage).map(n => n.dataset.path) : null,
                   served: lineage ? all('g.lineage-node.served', lineage).map(n => n.dataset.path) : null};
  }
  const graph = document.getElementById('sharing-graph');
  const graphSvg = graph && graph.querySelector('svg');
  const boxes = graph ? all('g.node', graph).map(g => { const b = g.getBBox(); return [g.id, b.x, b.y, b.width, b.height]; }) : [];
  return {
    title: document.title,
    summaryTasks: Number(document.getElementById('summary').dataset.tasks),
    tasks,
    mu: all('#mu-heatmap g.mu-cell').map(c => [c.dataset.task, c.dataset.key, Number(c.dataset.value)]),
    muPlot: plot('mu-heatmap'),
    rows: all('#params-table tr.task-row').map(r => [r.dataset.task, Number(r.dataset.pathParams), Number(r.dataset.flops)]),
    bars: all('#params-chart g.bar').map(b => [b.dataset.task, b.dataset.metric, Number(b.dataset.value)]),
    flopBars: all('#flops-chart g.bar').map(b => [b.dataset.task, Number(b.dataset.value)]),
    graph: graph && {renderer: graph.dataset.renderer, width: graphSvg.getBoundingClientRect().width,
                     tasks: all('g.task', graph).map(g => g.id), groups: all('g.group', graph).map(g => g.id),
                     roots: all('g.root', graph).length, edges: all('g.share-edge', graph).length, boxes},
  };
})()"""


def overlaps(boxes) -> list[tuple[str, str]]:
    found = []
    for i, (a, ax, ay, aw, ah) in enumerate(boxes):
        for b, bx, by, bw, bh in boxes[i + 1:]:
            if ax < bx + bw - 1 and bx < ax + aw - 1 and ay < by + bh - 1 and by < ay + ah - 1:
                found.append((a, b))
    return found


# ---- the real server --------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(server_factory):
    running = server_factory.start()
    yield running
    assert running.stop() == 0, running.log()[-4000:]


@pytest.fixture(scope="module")
def system(server):
    """The searches of TASKS run to the end; what the server says about them, read independently of
    the report's code: the tasks, the summary and every event up to the last SearchFinished."""
    with client_lib.EvolveClient(server.address, timeout=60) as client:
        operations = []
        for name, bundled, generations in TASKS:
            spec = evolve_pb2.TaskSpec(name=name, bundled=evolve_pb2.BundledSource(name=bundled))
            spec.budget.generations = generations
            operations.append(client.submit_task(spec).name)
        for name in operations:
            assert client.wait_done(name, timeout=600).HasField("response"), client.get_operation(name)
        events = []
        with client.watch() as stream:
            for event in stream:
                events.append(event)
                if sum(e.WhichOneof("kind") == "search_finished" for e in events) == len(operations):
                    break
        return {"tasks": {t.name: t for t in client.list_tasks()}, "summary": client.system(), "events": events}


def evolve_cli(server, *argv: str) -> subprocess.CompletedProcess:
    """`python -m service.cli --server ... ARGV` in a subprocess; it must succeed."""
    result = subprocess.run([sys.executable, "-m", "service.cli", "--server", server.address, *argv], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"{result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def pages(server, system, tmp_path_factory):
    """`evolve report` twice: the default layout (Graphviz when installed; --json) and the builtin one."""
    out = tmp_path_factory.mktemp("report")
    auto = evolve_cli(server, "report", "--out", str(out / "auto"), "--replay-wait", "1", "--json")
    builtin = evolve_cli(server, "report", "--out", str(out / "builtin"), "--graph", "builtin", "--replay-wait", "1")
    return {"auto": out / "auto" / "index.html", "builtin": out / "builtin" / "index.html",
            "json": json.loads(auto.stdout), "text": builtin.stdout}


def test_cli_writes_the_page(pages, system):
    """What can be checked without a browser: the CLI's answer and the plots' elements in the file."""
    events = len(system["events"])
    assert pages["json"] == {"path": str(pages["auto"]), "tasks": len(TASKS), "events": events}
    assert pages["text"] == f"report of {len(TASKS)} tasks ({events} events) written to {pages['builtin']}\n"
    expected = expected_of(system)
    for layout in ("auto", "builtin"):
        page = pages[layout].read_text(encoding="utf-8")
        assert "<script" not in page and not re.search(r"""(src|href|url)\s*[=(]\s*["']?\w+://""", page)
        for name, _, _ in TASKS:
            score_plot = re.search(rf'<svg id="score-{name}".*?</svg>', page, flags=re.DOTALL).group(0)
            assert score_plot.count('<circle class="candidate') == len(expected["scored"][name])
            lineage = re.search(rf'<svg id="lineage-{name}".*?</svg>', page, flags=re.DOTALL).group(0)
            assert lineage.count('<g class="lineage-node') == len(expected["accepted"][name])
        renderer = re.search(r'<div id="sharing-graph" data-renderer="(\w+)"', page).group(1)
        assert renderer == ("graphviz" if layout == "auto" and shutil.which("dot") else "builtin")


def expected_of(system) -> dict:
    """Per task what the page must show, from the server's own answers."""
    scored = collections.defaultdict(list)
    accepted = collections.defaultdict(list)
    served = {}
    for event in system["events"]:
        kind = event.WhichOneof("kind")
        if kind == "candidate_scored":
            scored[event.task].append(event.candidate_scored)
        elif kind == "candidate_accepted" and event.candidate_accepted.path_id not in accepted[event.task]:
            accepted[event.task].append(event.candidate_accepted.path_id)
        elif kind == "search_finished":
            served[event.task] = event.search_finished.path_id
    return {"scored": scored, "accepted": accepted, "served": served}


def test_report_page_in_a_real_browser(browser, pages, system, tmp_path):
    page = browser.open(pages["auto"].as_uri())
    shot = page.screenshot(tmp_path / "report.png")
    assert shot.read_bytes()[:8] == PNG_MAGIC and shot.stat().st_size > 20_000
    assert page.errors() == []
    assert [url for url in page.requests() if not url.startswith("file://")] == []  # the page works offline
    seen = page.evaluate(READ_PAGE)
    tasks, expected = system["tasks"], expected_of(system)
    assert seen["title"].startswith("evolve report") and seen["summaryTasks"] == len(TASKS)
    assert sorted(seen["tasks"]) == sorted(tasks)
    for name in tasks:
        shown = seen["tasks"][name]
        scores = sorted(c.score for c in expected["scored"][name])
        qualities = sorted(c.quality for c in expected["scored"][name])
        assert len(scores) >= 2
        assert sorted(shown["score"]["candidates"]) == pytest.approx(scores, rel=1e-5)
        assert sorted(shown["accuracy"]["candidates"]) == pytest.approx(qualities, rel=1e-5)
        # learned probabilities per generation: the mean over the candidates' CandidateScored.learned_mu
        sums = collections.defaultdict(list)
        for c in expected["scored"][name]:
            assert c.learned_mu and "_mu_" in c.learned_mu
            for key, value in c.learned_mu.items():
                sums[(report.mu_kind(key), c.generation)].append(value)
        assert len({generation for _, generation in sums}) >= 1
        assert {(kind, g): v for kind, g, v in shown["learnedMu"]["mu"]} == pytest.approx(
            {key: sum(v) / len(v) for key, v in sums.items()}, rel=1e-5)
        for plot in ("score", "accuracy", "rates", "learnedMu", "lineage"):
            assert shown[plot]["width"] > 100 and shown[plot]["height"] > 100, (name, plot, shown[plot])
            assert shown[plot]["outside"] == 0, (name, plot)  # everything drawn inside its plot
        assert shown["steps"] == expected["accepted"][name]
        assert shown["served"] == [expected["served"][name]] == [shown["steps"][-1]]
        assert set(shown["score"]["best"]) == set(expected["accepted"][name])
    mu = {(task, key): float(value) for task, t in tasks.items() for key, value in t.hparams.items()
          if key.startswith("_mu_")}
    assert len(mu) > 2 * len(TASKS)
    assert {(task, key): value for task, key, value in seen["mu"]} == pytest.approx(mu, rel=1e-5)
    assert len(seen["mu"]) == len(mu) and seen["muPlot"]["outside"] == 0
    assert sorted(seen["rows"]) == sorted([t.name, t.path_params, pytest.approx(t.flops, rel=1e-5)]
                                          for t in tasks.values())
    assert sorted(seen["bars"]) == sorted(
        [name, metric, pytest.approx(value, rel=1e-5)] for name, t in tasks.items()
        for metric, value in (("own", t.own_params), ("charged", t.accounted_params), ("whole path", t.path_params)))
    assert sorted(seen["flopBars"]) == sorted([name, pytest.approx(t.flops, rel=1e-5)] for name, t in tasks.items())
    check_graph(seen["graph"], tasks)
    assert seen["graph"]["renderer"] == ("graphviz" if shutil.which("dot") else "builtin")


def check_graph(graph: dict, tasks: dict) -> None:
    """The sharing graph has a node per task and one per set of tasks sharing components (from GetTask)."""
    users = collections.defaultdict(set)
    for name, task in tasks.items():
        for component in task.components:
            users[component.id] |= {name, *component.locked_by}
    sharing_sets = {frozenset(u) for u in users.values() if len(u) > 1}
    assert sorted(graph["tasks"]) == sorted(f"graph-task-{name}" for name in tasks)
    assert len(graph["groups"]) == len(sharing_sets)
    assert graph["edges"] == sum(len(s) for s in sharing_sets)
    assert graph["roots"] == int(any(ROOT_TASK in s for s in sharing_sets))
    assert graph["width"] > 100
    assert overlaps(graph["boxes"]) == []


def test_builtin_graph_layout_in_a_real_browser(browser, pages, system):
    page = browser.open(pages["builtin"].as_uri())
    assert page.errors() == []
    seen = page.evaluate(READ_PAGE)
    assert seen["graph"]["renderer"] == "builtin"
    check_graph(seen["graph"], system["tasks"])


def test_graphviz_and_builtin_draw_the_same_shared_graph(browser, tmp_path):
    """A system with sharing (the tiny server's random root shares nothing): the same nodes and edges
    either way, none overlapping; the builtin one forced, Graphviz's when `dot` is installed."""
    data = synthetic_report()
    layouts = ["builtin"] + (["graphviz"] if shutil.which("dot") else [])
    for layout in layouts:
        path = tmp_path / f"{layout}.html"
        path.write_text(report.render_html(data, graph_layout=layout), encoding="utf-8")
        page = browser.open(path.as_uri())
        assert page.errors() == []
        graph = page.evaluate(READ_PAGE)["graph"]
        assert graph["renderer"] == layout
        assert sorted(graph["tasks"]) == ["graph-task-a", "graph-task-b", "graph-task-c"]
        assert len(graph["groups"]) == 2 and graph["roots"] == 1 and graph["edges"] == 5
        assert overlaps(graph["boxes"]) == []
        page.screenshot(tmp_path / f"{layout}.png")


def test_the_browser_check_sees_errors_and_requests(browser, tmp_path):
    """The checks above could fail: a page that breaks the CSP and throws is reported."""
    path = tmp_path / "broken.html"
    path.write_text(f'<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" content="{report.CSP}">'
                    '</head><body><img src="http://127.0.0.1:9/x.png"><script>throw new Error("boom")</script>'
                    "</body></html>", encoding="utf-8")
    page = browser.open(path.as_uri())
    errors = page.errors()
    assert "http://127.0.0.1:9/x.png" in page.requests()
    assert any("Content Security Policy" in e and "127.0.0.1:9" in e for e in errors), errors
    assert any("script" in e.lower() for e in errors), errors  # the inline script was refused too


@pytest.mark.parametrize(("argv", "message"), [
    (["--out", "{file}"], "is not a directory"),
    (["--replay-wait", "0"], "--replay-wait must be positive"),
])
def test_cli_report_usage_errors(server, tmp_path, argv, message):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    argv = [arg.format(file=not_a_dir) for arg in argv]
    result = subprocess.run([sys.executable, "-m", "service.cli", "--server", server.address, "report", *argv],
                            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and message in result.stderr and result.stdout == ""


# ---- the renderer's parts, without server or browser -----------------------------------


def event(sequence: int, task: str, operation: str, **kind) -> evolve_pb2.Event:
    return evolve_pb2.Event(sequence=sequence, task=task, operation=operation, **kind)


def scored(path_id: str, generation: int, score: float, parent: str = "p0", mutations=(), mu=None) -> dict:
    return {"candidate_scored": evolve_pb2.CandidateScored(
        path_id=path_id, parent_id=parent, parent_task="a", generation=generation, score=score, quality=score,
        mutations=list(mutations), accepted_into_population=bool(path_id), learned_mu=mu or {})}


def accepted(path_id: str, score: float) -> dict:
    return {"candidate_accepted": evolve_pb2.CandidateAccepted(path_id=path_id, score=score, quality=score)}


def started(kind: str, generations: int) -> dict:
    return {"search_started": evolve_pb2.SearchStarted(kind=kind, plan=evolve_pb2.SearchPlan(generations=generations))}


def test_searches_from_events_split_runs_and_keep_the_first_acceptance():
    events = [
        event(1, "a", "operations/1", **started("extension", 2)),
        event(2, "a", "operations/1", **scored("p1", 1, 0.5, mutations=["hp:learning_rate=0.01", "clone:cls"])),
        event(3, "a", "operations/1", **scored("", 1, 0.4, mu={"_mu_": 0.1, "_mu_|clone:encoderblock_0": 0.1,
                                                               "_mu_|clone:encoderblock_1": 0.2})),
        event(4, "a", "operations/1", **accepted("p1", 0.5)),
        event(5, "", "", checkpoint_written=evolve_pb2.CheckpointWritten(step=2)),
        event(6, "a", "operations/1", **scored("p2", 2, 0.6, parent="p1", mutations=["add:residual_adapter_1"],
                                               mu={"_mu_": 0.12, "_mu_|clone:encoderblock_0": 0.08})),
        event(7, "a", "operations/1", **accepted("p2", 0.6)),
        event(8, "a", "operations/1", **accepted("p2", 0.6)),  # an unchanged best re-announced
        event(9, "a", "operations/1", search_finished=evolve_pb2.SearchFinished(path_id="p2", state="SUCCEEDED")),
        event(10, "a", "operations/2", **started("generalization", 1)),  # improve of every task: one per task
        event(11, "b", "operations/2", **started("generalization", 1)),
        event(12, "b", "operations/2", **scored("p9", 1, 0.7)),
        event(13, "b", "operations/2", **started("generalization", 1)),  # re-run after a restart
        event(14, "b", "operations/2", **scored("p10", 1, 0.8)),
    ]
    searches = report.searches_from_events(reversed(events))  # sorted by sequence inside
    assert [(s.task, s.operation, s.kind, len(s.candidates)) for s in searches] == [
        ("a", "operations/1", "extension", 3), ("a", "operations/2", "generalization", 0),
        ("b", "operations/2", "generalization", 1), ("b", "operations/2", "generalization", 1)]
    first = searches[0]
    assert [step.path_id for step in first.lineage] == ["p1", "p2"]
    assert first.lineage[1].candidate.parent_id == "p1" and first.finished.path_id == "p2"
    assert report.mutation_rates(first) == {"add:residual_adapter": {1: 0.0, 2: 1.0}, "clone:cls": {1: 0.5, 2: 0.0},
                                            "hp:learning_rate": {1: 0.5, 2: 0.0}}
    assert report.learned_mu_means(first) == {"_mu_": {1: 0.1, 2: 0.12},
                                              "clone:encoderblock": {1: pytest.approx(0.15), 2: 0.08}}
    assert list(report.learned_mu_means(first)) == ["_mu_", "clone:encoderblock"]  # the global rate first
    assert first.generations == 2 and searches[1].generations == 1
    svg = report.lineage_svg("a", searches[:2])
    assert svg.count('class="lineage-node') == 2 and "(the previous best)" in svg and "serves p2" in svg


def component(name: str, identifier: str, *locked_by: str, params: int = 100) -> evolve_pb2.ComponentRef:
    return evolve_pb2.ComponentRef(name=name, id=identifier, locked_by=list(locked_by), params=params)


def synthetic_tasks() -> list[evolve_pb2.Task]:
    """a and b share two root layers frozen; b and c share one of b's blocks; each has its own head."""
    def task(name, components, **mu):
        return evolve_pb2.Task(name=name, status=evolve_pb2.TASK_STATUS_READY, path_version=1, components=components,
                               hparams={"_mu_": "0.1", **{f"_mu_|{k}": str(v) for k, v in mu.items()}, "lr": "0.1"},
                               own_params=100, accounted_params=150.0, path_params=400, flops=1e6)
    return [
        task("a", [component("embedding", "c1", "__root__", "a", "b"), component("cls", "c2", "__root__", "a", "b"),
                   component("head", "c3", "a")], **{"clone:cls": 0.2}),
        task("b", [component("embedding", "c1", "__root__", "a", "b"), component("cls", "c2", "__root__", "a", "b"),
                   component("encoderblock_0", "c4", "b", "c"), component("head", "c5", "b")]),
        task("c", [component("encoderblock_0", "c4", "b", "c"), component("head", "c6", "c")], **{"hp:lr": 0.3}),
    ]


def synthetic_report(searches=()) -> report.Report:
    summary = evolve_pb2.SystemSummary(num_tasks=3, num_components=6, total_params=600)
    data = report.build_report(synthetic_tasks(), summary, [], server="test")
    return report.Report(server=data.server, generated_at=data.generated_at, system=data.system, tasks=data.tasks,
                         searches=tuple(searches), events_read=0)


def test_sharing_graph_groups_components_by_the_tasks_that_share_them():
    graph = report.sharing_graph([report.task_row(t) for t in synthetic_tasks()])
    kinds = [(node.kind, node.lines) for node in graph.nodes]
    assert kinds == [
        ("root", ("root model",)),
        ("task", ("a", "own: 1 component, 100 params")),
        ("task", ("b", "own: 1 component, 100 params")),
        ("task", ("c", "own: 1 component, 100 params")),
        ("group", ("2 shared components, 200 params", "embedding, cls")),
        ("group", ("1 shared component, 100 params", "encoderblock_0")),
    ]
    assert sorted(graph.edges) == sorted([("t:__root__", "g:0"), ("t:a", "g:0"), ("t:b", "g:0"), ("t:b", "g:1"),
                                          ("t:c", "g:1")])
    dot = report.graph_dot(graph)
    assert dot.count("class=\"share-edge\"") == 5 and 'id="graph-task-a", class="task"' in dot


def test_layered_layout_layers_orders_and_separates():
    sizes = {"t1": (80, 30), "t2": (60, 30), "t3": (60, 30), "g_for_t3": (100, 40), "g_for_t1": (50, 40)}
    edges = [("t1", "g_for_t1"), ("t3", "g_for_t3"), ("g_for_t3", "t2")]  # a longer chain: three layers
    placed = report.layered_layout(sizes, edges, gap_x=20, gap_y=50)
    assert {name: p.layer for name, p in placed.items()} == {"t1": 0, "t3": 0, "g_for_t1": 1, "g_for_t3": 1, "t2": 2}
    first, second = placed["g_for_t1"], placed["g_for_t3"]
    assert first.x < second.x  # ordered like their parents: no crossing
    assert second.x - first.x >= (first.width + second.width) / 2 + 20
    assert placed["t2"].y - placed["g_for_t3"].y == pytest.approx(20 + 50 + 15)  # half heights plus the gap
    cycle = report.layered_layout({"x": (10, 10), "y": (10, 10)}, [("x", "y"), ("y", "x")])
    assert sorted(p.layer for p in cycle.values()) == [0, 1]


def test_every_svg_of_a_page_is_well_formed_xml():
    searches = report.searches_from_events([
        event(1, "a", "operations/1", **started("extension", 2)),
        event(2, "a", "operations/1", **scored("p1", 1, 0.5, mutations=["hp:x=<1&2>"])),
        event(3, "a", "operations/1", **accepted("p1", 0.5)),
    ])
    page = report.render_html(synthetic_report(searches), graph_layout="builtin")
    svgs = re.findall(r"<svg\b.*?</svg>", page, flags=re.DOTALL)
    # a's four plots and lineage (b and c have no events), the mu heatmap, two bar charts, the sharing graph
    assert len(svgs) == 5 + 1 + 2 + 1
    for svg in svgs:
        ElementTree.fromstring(svg)
    assert "hp:x=&lt;1&amp;2&gt;" in page and "<script" not in page


def test_without_graphviz_the_graph_falls_back_to_the_builtin_layout(monkeypatch, caplog):
    graph = report.sharing_graph([report.task_row(t) for t in synthetic_tasks()])
    monkeypatch.setattr(report.shutil, "which", lambda name: None)  # no `dot` on PATH
    auto = report.sharing_graph_html(graph, "auto")
    assert auto.startswith('<div id="sharing-graph" data-renderer="builtin" data-groups="2" data-edges="5">')
    assert report.sharing_graph_html(graph, "graphviz") == auto and "not available" in caplog.text
    ElementTree.fromstring(auto)
