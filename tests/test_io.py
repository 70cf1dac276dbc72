"""pyalign.io: atomic writers leave the old file or the new one; JSONL appends resume after the
last complete row, dropping a torn line left by a kill."""

import json

import pytest

from pyalign.io import (
    JsonlAppender, atomic_directory, read_jsonl_rows, save_figure_atomic, torch_save_atomic, write_json_atomic,
    write_jsonl_atomic,
)


def test_write_json_atomic_replaces_and_leaves_no_partial(tmp_path):
    path = tmp_path / "sub" / "a.json"
    write_json_atomic(path, {"b": 1, "a": tmp_path})
    write_json_atomic(path, {"c": 2})
    assert json.loads(path.read_text()) == {"c": 2}
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_atomic_directory_keeps_the_old_folder_on_error(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as partial:
        (partial / "w.txt").write_text("one")
    with pytest.raises(RuntimeError), atomic_directory(target) as partial:
        (partial / "w.txt").write_text("two")
        raise RuntimeError("killed")
    assert (target / "w.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_jsonl_appender_resumes_after_a_torn_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    with JsonlAppender(path) as out:
        out.write({"i": 0})
        out.write({"i": 1})
    with path.open("a") as handle:  # what a kill in the middle of a write leaves
        handle.write('{"i": 2, "text": "hal')
    assert read_jsonl_rows(path) == [{"i": 0}, {"i": 1}]
    with JsonlAppender(path) as out:
        assert out.count == 2
        out.write({"i": 2})
    assert [r["i"] for r in read_jsonl_rows(path)] == [0, 1, 2]
    assert path.read_text().endswith("\n")


def test_read_jsonl_rows_names_a_broken_line(tmp_path):
    path = write_jsonl_atomic(tmp_path / "x.jsonl", [{"a": 1}])
    with path.open("a") as handle:
        handle.write("not json\n{\"a\": 2}\n")
    with pytest.raises(ValueError, match=r"x.jsonl:2: not valid JSON"):
        read_jsonl_rows(path)


def test_torch_save_atomic_round_trip(tmp_path):
    import torch

    path = torch_save_atomic({"t": torch.arange(3)}, tmp_path / "s.pt")
    assert torch.equal(torch.load(path)["t"], torch.arange(3))


def test_save_figure_atomic_writes_a_png_and_closes_the_figure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots()
    axis.plot([0, 1], [1, 0])
    path = save_figure_atomic(figure, tmp_path / "plots" / "a.png")
    assert path.read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in path.parent.iterdir()] == ["a.png"]
    assert not plt.fignum_exists(figure.number)
