"""JSON Lines results that survive being killed: append and fsync each record, resume from what is left.

A run writes to ``<output>.partial`` and renames it to ``<output>`` only when every image is done, so a
finished file is never half-written and an older finished file is only replaced by a complete one. A kill
can leave at most one incomplete last line in the ``.partial`` file; :func:`read_records` drops it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

PARTIAL_SUFFIX = ".partial"


def partial_path(output: Path) -> Path:
    """Where a run writes before its output is complete (``out.jsonl`` -> ``out.jsonl.partial``)."""
    return output.with_name(output.name + PARTIAL_SUFFIX)


def encode(record: dict[str, Any]) -> str:
    """One record as one line of strict JSON (no embedded newlines), ending in a newline.

    Non-finite floats, which JSON cannot hold, become null.
    """
    return strict_json(record) + "\n"


def strict_json(value: Any, indent: int | None = None) -> str:
    """``value`` as standard JSON, which other tools parse: non-finite floats (NaN for a metric without
    images, say) become null instead of Python's ``NaN``. Text is kept as UTF-8 characters, except where a
    string cannot be UTF-8: a file name in another encoding, which Python holds with lone surrogates
    (``os.fsdecode``). Such a value is written with ``\\u`` escapes, which read back to the same name."""
    value = finite_values(value)
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, indent=indent)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, ensure_ascii=True, allow_nan=False, indent=indent)
    return text


def finite_number(value: Any) -> float | None:
    """A record field as a float when it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def finite_values(value: Any) -> Any:
    """``value`` (dicts, lists, tuples, numbers) with every non-finite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_values(v) for v in value]
    return value


def read_records(path: Path) -> list[dict[str, Any]]:
    """The complete, valid records of a JSON Lines file; a missing file gives none.

    A line counts only when it ends in a newline, parses as a JSON object and names its ``image``:
    anything else is what a kill in mid-write leaves behind, and is dropped.
    """
    if not path.exists():
        return []
    records = []
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # the last line, cut short
            if (record := parse_record(raw)) is not None:
                records.append(record)
    return records


def has_boxes(record: dict[str, Any]) -> bool:
    """Whether a record holds the image's localization: no error, or only one after it was localized (its mask or
    overlay picture could not be saved, so that --resume redoes it), with its predictions kept."""
    return record.get("error") is None or bool(record.get("predictions"))


def parse_record(raw: bytes) -> dict[str, Any] | None:
    """One line of a JSON Lines results file as a record: a JSON object naming its ``image``; None otherwise."""
    try:
        record = json.loads(raw.decode("utf-8-sig"))  # a file saved by an editor may begin with a BOM
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("image"), str) else None


def write_atomic(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace ``path`` with exactly ``records``, never leaving a half-written file behind."""
    write_text_atomic(path, "".join(encode(r) for r in records))


def superseded_path(folder: Path, prefix: str = "", suffix: str = "") -> Path:
    """``folder/<prefix>superseded-<UTC time><suffix>``, a name not yet taken (``-2``, ``-3``... before the
    suffix if it is): where earlier results are moved rather than overwritten."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path, n = Path(folder) / f"{prefix}superseded-{stamp}{suffix}", 1
    while path.exists():
        n += 1
        path = Path(folder) / f"{prefix}superseded-{stamp}-{n}{suffix}"
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """Replace ``path`` with ``text`` through a synced temporary file and a rename: a complete file or none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, new_file_mode())  # mkstemp makes 0600; results are as readable as any file the user writes
        # surrogateescape: a file name in another encoding is written back as the bytes it has on disk
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def new_file_mode() -> int:
    """The permissions ``open()`` would give a new file under the process's umask (0o644 under umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class OutputBusyError(RuntimeError):
    """Another run is writing the same output."""


@contextmanager
def exclusive_output(output: Path) -> Iterator[None]:
    """Hold ``OUTPUT.lock`` while a run writes ``output``: a second run on the same output stops at once, rather
    than moving the first one's ``.partial`` aside and failing at its end. The lock file is removed afterwards.

    Raises:
        OutputBusyError: when another process holds it.
    """
    from filelock import FileLock, Timeout

    path = output.with_name(output.name + ".lock")
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise OutputBusyError(f"another run is writing {output} (it holds {path}); wait for it to end, "
                              "or choose another output") from None
    try:
        yield
    finally:
        lock.release()
        path.unlink(missing_ok=True)


def finish(partial: Path, output: Path) -> None:
    """Make the completed ``partial`` file the output, atomically; its settings file (:func:`settings_path`)
    goes with it."""
    os.replace(partial, output)
    if settings_path(partial).is_file():
        os.replace(settings_path(partial), settings_path(output))
    _fsync_directory(output.parent)


SETTINGS_SUFFIX = ".settings.json"


def is_results_file(path: Path) -> bool:
    """Whether ``path`` looks like a results file of ``localize`` (settings recorded beside it, or a first line that
    is a JSON object naming its ``image``), which a new run may replace."""
    if settings_path(path).is_file():
        return True
    try:
        with open(path, "rb") as f:
            return parse_record(f.readline(1 << 20)) is not None
    except OSError:
        return False


def settings_path(path: Path) -> Path:
    """The file beside a results file that records the settings its lines were made with
    (``out.jsonl`` -> ``out.jsonl.settings.json``)."""
    return path.with_name(path.name + SETTINGS_SUFFIX)


class UnreadableSettings(ValueError):
    """A settings file exists but does not hold readable settings (damaged, or not neuroloc's)."""


def read_settings(path: Path, strict: bool = False) -> dict[str, Any] | None:
    """The settings recorded for the results file ``path``; None when none were (files of older versions), or when
    the file cannot be read.

    Raises:
        UnreadableSettings: with ``strict``, for a settings file that exists but cannot be read as settings.
    """
    file = settings_path(path)
    try:
        settings = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        if strict:
            raise UnreadableSettings(f"{file} cannot be read ({type(exc).__name__})") from None
        return None
    if not isinstance(settings, dict):
        if strict:
            raise UnreadableSettings(f"{file} does not hold settings (a JSON object)")
        return None
    return settings


def write_settings(path: Path, settings: dict[str, Any]) -> None:
    """Record ``settings`` (JSON-able; other values as their ``str``) for the results file ``path``."""
    write_text_atomic(settings_path(path), strict_json(json_ready(settings), indent=2) + "\n")


def json_ready(value: Any) -> Any:
    """``value`` as JSON would give it back: tuples as lists, paths and other objects as strings."""
    return json.loads(json.dumps(value, default=str))


def settings_changes(stored: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """``"key: stored -> current"`` for every setting that differs (nested keys joined with dots). A key missing
    from ``stored`` is a setting a newer version added: a change only where ``current`` leaves its default
    (``defaults``, keyed the same way), so that upgrading does not refuse to resume."""
    old, new, usual = _flat(json_ready(stored)), _flat(json_ready(current)), _flat(json_ready(defaults))
    changes = []
    for key in sorted(old.keys() | new.keys()):
        if key not in old and key in usual and new.get(key) == usual[key]:
            continue
        if old.get(key, "(not set)") != new.get(key, "(not set)"):
            changes.append(f"{key}: {old.get(key, '(not set)')} -> {new.get(key, '(not set)')}")
    return changes


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict) or not value:
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


class RecordWriter:
    """Appends records to a file, each flushed to disk before the next one starts.

    Args:
        stream: an open text stream (a file opened for appending, or stdout).
        durable: fsync after every record (off for pipes and terminals).
    """

    def __init__(self, stream: IO[str], durable: bool = True) -> None:
        self._stream = stream
        self._durable = durable

    @classmethod
    def append_to(cls, path: Path) -> RecordWriter:
        """A writer appending to ``path`` (created if missing)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        return cls(open(path, "a", encoding="utf-8"), durable=True)

    def write(self, record: dict[str, Any]) -> None:
        self._stream.write(encode(record))
        self._stream.flush()
        if self._durable:
            os.fsync(self._stream.fileno())

    def close(self) -> None:
        if self._durable:
            self._stream.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fsync_directory(directory: Path) -> None:
    # A rename is only durable once the directory entry is; not every OS lets us open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
