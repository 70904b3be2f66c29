"""Local paths and tfds data_dir are confined to the data roots when roots are given."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from evolve.data import load_task_data, write_npz_task
from evolve.data.paths import resolve_path
from evolve.errors import InvalidArgumentError
from evolve.types import ImageFolderSource, NpzSource, TaskSpec, TfdsSource


@pytest.fixture
def layout(tmp_path):
    """root/ (allowed), root2/ (allowed), outside/ (not), each holding a task file."""
    images = np.random.default_rng(0).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    labels = np.arange(10) % 2
    dirs = {name: tmp_path / name for name in ("root", "root2", "outside")}
    for name, folder in dirs.items():
        folder.mkdir()
        write_npz_task(folder / "x.npz", images, labels)
    (dirs["root"] / "sub").mkdir()
    write_npz_task(dirs["root"] / "sub" / "y.npz", images, labels)
    return {name: str(path) for name, path in dirs.items()}


def _npz(path: str, roots) -> int:
    return load_task_data(TaskSpec("t", NpzSource(path)), data_roots=roots).num_classes


def _rejected(spec_source, roots, field: str = "source.path") -> None:
    with pytest.raises(InvalidArgumentError, match="data roots") as info:
        load_task_data(TaskSpec("t", spec_source), data_roots=roots)
    assert info.value.field == field


def test_relative_paths_resolve_against_the_first_root(layout):
    roots = [layout["root"], layout["root2"]]
    assert _npz("x.npz", roots) == 2
    assert _npz("sub/y.npz", roots) == 2
    assert _npz("sub/../x.npz", roots) == 2  # '..' that stays inside is fine


def test_absolute_paths_inside_any_root_are_allowed(layout):
    roots = [layout["root"], layout["root2"]]
    assert _npz(os.path.join(layout["root2"], "x.npz"), roots) == 2
    assert _npz(os.path.join(layout["root"], "sub", "y.npz"), roots) == 2


def test_dotdot_escape_is_rejected(layout):
    _rejected(NpzSource("../outside/x.npz"), [layout["root"]])
    _rejected(NpzSource("sub/../../outside/x.npz"), [layout["root"]])


def test_absolute_path_outside_is_rejected(layout):
    _rejected(NpzSource(os.path.join(layout["outside"], "x.npz")), [layout["root"]])
    _rejected(NpzSource("/etc/passwd"), [layout["root"]])


def test_sibling_with_common_prefix_is_outside(layout, tmp_path):
    twin = tmp_path / "root_evil"
    twin.mkdir()
    write_npz_task(twin / "x.npz", np.zeros((4, 2, 2, 3), np.uint8), [0, 1, 0, 1])
    _rejected(NpzSource(str(twin / "x.npz")), [layout["root"]])


def test_symlink_escaping_the_root_is_rejected(layout):
    link = os.path.join(layout["root"], "link.npz")
    os.symlink(os.path.join(layout["outside"], "x.npz"), link)
    _rejected(NpzSource("link.npz"), [layout["root"]])
    dir_link = os.path.join(layout["root"], "dirlink")
    os.symlink(layout["outside"], dir_link)
    _rejected(NpzSource("dirlink/x.npz"), [layout["root"]])


def test_symlink_staying_inside_is_allowed(layout):
    os.symlink(os.path.join(layout["root"], "sub", "y.npz"), os.path.join(layout["root"], "alias.npz"))
    assert _npz("alias.npz", [layout["root"]]) == 2


def test_root_given_through_a_symlink(layout, tmp_path):
    alias = tmp_path / "alias_root"
    os.symlink(layout["root"], alias)
    assert _npz("x.npz", [str(alias)]) == 2
    assert _npz(os.path.join(layout["root"], "x.npz"), [str(alias)]) == 2


def test_without_roots_any_path_is_allowed(layout):
    assert _npz(os.path.join(layout["outside"], "x.npz"), ()) == 2


def test_a_single_string_root_is_one_root(layout):
    assert _npz("x.npz", layout["root"]) == 2


def test_image_folder_escape_and_escaping_file(layout, tmp_path):
    _rejected(ImageFolderSource("../outside"), [layout["root"]])
    folder = os.path.join(layout["root"], "imgs")
    outside_png = tmp_path / "outside" / "secret.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(outside_png)
    for name in ("a", "b"):
        os.makedirs(os.path.join(folder, name))
        for i in range(3):
            Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(os.path.join(folder, name, f"{i}.png"))
    source = ImageFolderSource("imgs", validation_fraction=0.2, test_fraction=0.2)
    assert load_task_data(TaskSpec("t", source), data_roots=[layout["root"]]).num_classes == 2
    os.symlink(outside_png, os.path.join(folder, "a", "leak.png"))
    _rejected(source, [layout["root"]])


def test_tfds_data_dir_outside_the_roots_is_rejected(layout):
    _rejected(TfdsSource("mnist", data_dir=layout["outside"]), [layout["root"]], field="source.data_dir")
    _rejected(TfdsSource("mnist", data_dir="../outside"), [layout["root"]], field="source.data_dir")


def test_resolve_path_returns_real_paths(layout):
    real = resolve_path("sub/../x.npz", "f", [layout["root"]])
    assert real == os.path.realpath(os.path.join(layout["root"], "x.npz"))
    with pytest.raises(InvalidArgumentError) as info:
        resolve_path(None, "source.path", [layout["root"]])
    assert info.value.field == "source.path"
