"""tfds's first import patches `builtins.__import__` for the whole process
(etils lazy_imports); `tfds_source.preload()` takes that window before other
threads import anything. In fresh interpreters, since it is about a first import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]

# While tfds's first import has etils' lazy-import window open (its
# `epy.lazy_imports` block, wrapped here so that it waits), another thread
# imports grpc's server module, as grpc does on every call; prints how many
# times that thread got something other than the module. The wrapper only
# holds the window open until the other thread's import is done, so the
# overlap that a busy server hits by chance happens every time.
RACE = r"""
import contextlib, sys, threading
import grpc
from etils import epy
from evolve.data import tfds_source
inside, imported = threading.Event(), threading.Event()
armed = False
real_window = epy.lazy_imports

@contextlib.contextmanager
def held_window(*args, **kwargs):
    with real_window(*args, **kwargs):
        if armed:
            inside.set()
            imported.wait(30)
        yield

epy.lazy_imports = held_window
if sys.argv[1] == "preload":
    assert tfds_source.preload()
armed = True
wrong = []
def importer():
    inside.wait(30)
    from grpc import _server as module
    if type(module).__name__ != "module":
        wrong.append(type(module).__name__)
    imported.set()
thread = threading.Thread(target=importer)
thread.start()
import tensorflow_datasets
inside.set()
thread.join()
print(len(wrong))
"""


def _wrong_imports(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", RACE, mode], cwd=PROJECT, capture_output=True, text=True,
                          timeout=120, check=True)
    return int(done.stdout.split()[-1])


def test_a_first_tfds_import_beside_other_threads_hands_them_lazy_modules():
    """The hazard itself, why the server preloads: an import in another
    thread inside tfds's first-import window gets a lazy module."""
    assert _wrong_imports("race") == 1


def test_after_preload_other_threads_import_real_modules():
    """After preload, importing tfds again opens no window: the same import
    in another thread gets the module."""
    assert _wrong_imports("preload") == 0
