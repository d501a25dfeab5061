"""What SOURCES name: image files, folders, glob patterns and manifests (lists of images), for every command
that takes them (``localize``, local or Ray, ``calibrate``, ``bench``)."""

from __future__ import annotations

import csv
import glob
import os
from collections.abc import Sequence
from pathlib import Path

import click

from neuroloc.imageio import IMAGE_SUFFIXES

MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")
MANIFEST_COLUMNS = ("path", "image")
CLASS_COLUMN = "class"  # a .csv / .parquet manifest's optional column: the class(es) each image shows


def find_images(sources: Sequence[str]) -> list[Path]:
    """The image paths SOURCES name, in order, each once.

    A file is taken whatever its suffix (an unreadable one gets an error line), except a manifest: a .txt
    file (one path per line; blank lines and lines starting with # are skipped), or a .csv / .parquet file
    with a ``path`` or ``image`` column, whose paths are relative to the manifest's folder. Folders and globs
    contribute files with an image suffix (:data:`neuroloc.imageio.IMAGE_SUFFIXES`), sorted. Listed files
    that do not exist become error lines later, as unreadable files do.

    Raises:
        click.BadParameter: for a source that names nothing, a folder or glob without images, or an
            unreadable or empty manifest.
    """
    found: dict[str, Path] = {}
    for source in sources:
        path = Path(source)
        if _is_manifest(path, MANIFEST_SUFFIXES):
            try:
                paths = read_manifest(path)
            except (OSError, ValueError, ImportError) as exc:
                raise click.BadParameter(f"cannot read manifest {source}: {exc}", param_hint="SOURCES") from None
            if not paths:
                raise click.BadParameter(f"manifest {source} lists no images", param_hint="SOURCES")
        else:
            paths = _expand_source(source)
            if not paths:
                raise click.BadParameter(f"no image files found in {source!r}", param_hint="SOURCES")
        for each in paths:
            found.setdefault(path_key(each), each)
    return list(found.values())


def outside(images: Sequence[Path], folders: Sequence[Path | None]) -> list[Path]:
    """``images`` without those under ``folders`` (None entries are ignored): the pictures a run writes
    (--overlay, --masks ...) into a folder among its sources are not images to localize on the next run. Images
    in the folder's subfolders are left out too: a picture of one of them could take the name of an image at
    the folder's top level, and write over it."""
    roots = [path_key(f) + os.sep for f in folders if f is not None]
    return [p for p in images if not any(path_key(p).startswith(root) for root in roots)]


def absolute_path(path: str | Path, start: str | Path | None = None) -> str:
    """``path`` made absolute from ``start`` (default: this folder) without dropping its ``..`` parts by text, as
    ``os.path.abspath`` does: after a symbolic link to a folder, ``link/..`` is the parent of the link's target,
    which the system finds and the text does not."""
    return os.path.join(start or os.getcwd(), path)


def path_key(path: str | Path) -> str:
    """One string per file whatever the spelling of its path (relative or absolute, case on Windows): how
    results lines are matched to images."""
    return os.path.normcase(os.path.abspath(path))


def same_file_key(path: str | Path) -> str:
    """One string per file on disk, through symbolic links: what an output is compared with the images by, so
    that no spelling or link lets a run write over an image it reads."""
    return os.path.normcase(os.path.realpath(path))


def _is_manifest(path: Path, suffixes: Sequence[str]) -> bool:
    try:
        return path.suffix.lower() in suffixes and path.is_file()
    except OSError:  # a name too long, a folder on the way without permission: the file's error line says so later
        return False


def _expand_source(source: str) -> list[Path]:
    path = Path(source)
    try:
        if path.is_dir():
            return _images_under(path)
        if path.exists():
            return [path]
    except OSError:  # cannot be looked up (a name too long, no permission): an error line when it is read
        return [path]
    if not any(c in source for c in "*?["):
        raise click.BadParameter(f"no such file or folder: {source}", param_hint="SOURCES")
    paths: list[Path] = []
    for match in sorted(glob.glob(source, recursive=True)):
        m = Path(match)
        if m.is_dir():
            paths.extend(_images_under(m))
        elif m.is_file() and _is_image_name(m):
            paths.append(m)
    # ** follows links to folders, so a link back up (a loop) would give each file again under longer names
    unique: dict[str, Path] = {}
    for path in paths:
        unique.setdefault(os.path.realpath(path), path)
    return list(unique.values())


def _images_under(folder: Path) -> list[Path]:
    """The files with an image name under ``folder``, sorted, links to folders not followed. Links to nothing and
    files that cannot be read are kept, to get error lines; folders that cannot be read are told on stderr."""
    unreadable: list[OSError] = []
    found = [Path(root) / name for root, _, names in os.walk(folder, onerror=unreadable.append) for name in names]
    if unreadable:
        first = unreadable[0]
        click.echo(f"neuroloc: {len(unreadable)} folder(s) under {folder} cannot be read, their images are left out "
                   f"(e.g. {first.filename}: {first.strerror})", err=True)
    # a FIFO or socket named like an image is no image; a link to nothing (or a loop) is kept for its error line
    return sorted(p for p in found if _is_image_name(p) and (p.is_file() or not p.exists()))


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def read_manifest(manifest: Path) -> list[Path]:
    """The paths a .txt / .csv / .parquet manifest lists (see :func:`find_images`).

    Raises:
        ValueError: for a table without a ``path`` / ``image`` column.
    """
    return [path for path, _ in _manifest_rows(manifest)]


def manifest_classes(sources: Sequence[str]) -> dict[Path, list[str]]:
    """The classes that the .csv / .parquet manifests among SOURCES give their images in a ``class`` column,
    in row order: an image listed on several rows gets each row's class once. Empty when no manifest has the
    column; an image with an empty cell gets no class of its own."""
    classes: dict[Path, list[str]] = {}
    for source in sources:
        path = Path(source)
        if _is_manifest(path, (".csv", ".parquet")):
            for image, name in _manifest_rows(path):
                if name:
                    listed = classes.setdefault(image, [])
                    listed += [] if name in listed else [name]
    return classes


def _manifest_rows(manifest: Path) -> list[tuple[Path, str | None]]:
    """(path, class) of each row of a manifest; the class is None without a ``class`` column."""
    suffix = manifest.suffix.lower()
    entries: list[tuple[str, str | None]]
    if suffix == ".txt":
        lines = manifest.read_text(encoding="utf-8-sig").splitlines()  # -sig: a byte-order mark is no path
        entries = [(s.strip(), None) for s in lines if s.strip() and not s.strip().startswith("#")]
    elif suffix == ".csv":
        with open(manifest, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            column = _path_column(reader.fieldnames or [])
            entries = []
            for row in reader:
                image, label = (row.get(column) or "").strip(), (row.get(CLASS_COLUMN) or "").strip() or None
                if image:
                    entries.append((image, label))
                elif any((value or "").strip() for value in row.values() if isinstance(value, str)):
                    raise ValueError(f"line {reader.line_num} of {manifest.name} has no {column}")
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(manifest).names
        column = _path_column(names)
        table = pq.read_table(manifest, columns=[column, *([CLASS_COLUMN] if CLASS_COLUMN in names else [])])
        labels = table.column(CLASS_COLUMN).to_pylist() if CLASS_COLUMN in names else [None] * table.num_rows
        entries = [(str(v), None if c is None or str(c).strip() == "" else str(c).strip())
                   for v, c in zip(table.column(column).to_pylist(), labels) if v]
    else:
        raise ValueError(f"not a manifest ({', '.join(MANIFEST_SUFFIXES)})")
    base = manifest.parent
    return [(Path(e) if Path(e).is_absolute() else base / e, c) for e, c in entries]


def _path_column(names: Sequence[str]) -> str:
    for wanted in MANIFEST_COLUMNS:
        if wanted in names:
            return wanted
    raise ValueError(f"no 'path' or 'image' column (columns: {', '.join(names) or 'none'})")
