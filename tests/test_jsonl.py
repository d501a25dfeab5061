"""Kill-safe JSON Lines: what a cut-off write leaves behind is dropped, rewrites are atomic."""

from __future__ import annotations

import json
from pathlib import Path

from neuroloc.jsonl import RecordWriter, encode, finish, partial_path, read_records, write_atomic


def test_read_keeps_only_complete_records(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(
        b'{"image": "a.jpg", "error": null}\n'
        b"not json\n"
        b"[1, 2]\n"
        b'{"no_image": 1}\n'
        b'\xff\xfe\n'
        b'{"image": "b.jpg", "error": null}\n'
        b'{"image": "c.jpg", "err'  # cut off by a kill
    )
    assert [r["image"] for r in read_records(path)] == ["a.jpg", "b.jpg"]
    assert read_records(tmp_path / "missing.jsonl") == []


def test_a_complete_last_line_without_newline_is_still_dropped(tmp_path: Path) -> None:
    # A kill can land right after the closing brace and before the newline: the record may be cut.
    path = tmp_path / "out.jsonl"
    path.write_text('{"image": "a.jpg"}\n{"image": "b.jpg"}', encoding="utf-8")
    assert [r["image"] for r in read_records(path)] == ["a.jpg"]


def test_write_atomic_then_append_then_finish(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "out.jsonl"
    partial = partial_path(out)
    assert partial.name == "out.jsonl.partial"
    write_atomic(partial, [{"image": "a.jpg"}])
    with RecordWriter.append_to(partial) as writer:
        writer.write({"image": "b.jpg", "score": float("nan")})
    finish(partial, out)
    assert not partial.exists()
    assert read_records(out) == [{"image": "a.jpg"}, {"image": "b.jpg", "score": None}]
    assert list(out.parent.iterdir()) == [out]  # no temporary files left


def test_encode_is_one_strict_json_line() -> None:
    line = encode({"image": "a\nb.jpg", "box": (1.0, float("inf"))})
    assert line.count("\n") == 1 and line.endswith("\n")
    assert json.loads(line) == {"image": "a\nb.jpg", "box": [1.0, None]}


def test_superseded_path_never_reuses_a_name(tmp_path, monkeypatch):
    import neuroloc.jsonl
    from neuroloc.jsonl import superseded_path

    monkeypatch.setattr(neuroloc.jsonl.time, "strftime", lambda *_: "20261126T000000Z")  # both in one second

    first = superseded_path(tmp_path, "out.jsonl.", ".partial")
    assert first.parent == tmp_path and first.name.startswith("out.jsonl.superseded-") and first.name.endswith(".partial")
    first.write_text("kept")
    second = superseded_path(tmp_path, "out.jsonl.", ".partial")
    assert second.name == "out.jsonl.superseded-20261126T000000Z-2.partial" and not second.exists()
