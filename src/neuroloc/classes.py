"""ImageNet-1k class names and lookup of a target class by index, WordNet id or name."""

from __future__ import annotations

import csv
import difflib
from dataclasses import dataclass
from functools import cache
from importlib import resources


class ClassLookupError(ValueError):
    """An unknown or ambiguous class."""


@dataclass(frozen=True)
class ImageNetClass:
    index: int
    synset: str
    name: str  # all synonyms, comma separated, as in the ILSVRC metadata

    @property
    def short_name(self) -> str:
        return self.name.split(",")[0].strip()


@cache
def imagenet_classes() -> tuple[ImageNetClass, ...]:
    """The 1000 classes in the standard sorted-WNID order (label index = position)."""
    text = resources.files("neuroloc").joinpath("data/imagenet_classes.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(text.splitlines()))
    classes = tuple(ImageNetClass(int(r["label"]), r["synset"], r["name"]) for r in rows)
    assert [c.index for c in classes] == list(range(len(classes)))
    return classes


def resolve_class(query: str | int, classes: tuple[ImageNetClass, ...] | None = None) -> ImageNetClass:
    """A class from its index (``281``), WordNet id (``n02123045``) or name (``tabby``, case-insensitive).

    A name must match one synonym exactly or, failing that, be the start of exactly one synonym.
    Raises ClassLookupError listing the candidates when it is ambiguous or unknown.
    """
    classes = classes or imagenet_classes()
    text = str(query).strip()
    if text.lstrip("-").isdigit():
        index = int(text)
        if not 0 <= index < len(classes):
            raise ClassLookupError(f"class index {index} out of range 0..{len(classes) - 1}")
        return classes[index]
    by_synset = {c.synset: c for c in classes}
    if text in by_synset:
        return by_synset[text]
    wanted = text.lower()
    synonyms = [(s.strip().lower(), c) for c in classes for s in c.name.split(",")]
    exact = _unique([c for s, c in synonyms if s == wanted])
    if len(exact) == 1:
        return exact[0]
    candidates = exact or _unique([c for s, c in synonyms if s.startswith(wanted)])
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        listed = "; ".join(f"{c.index} {c.synset} ({c.short_name})" for c in candidates[:8])
        raise ClassLookupError(f"class name {text!r} is ambiguous: {listed}. Give the index or WordNet id")
    close = difflib.get_close_matches(wanted, [s for s, _ in synonyms], n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise ClassLookupError(f"unknown class {text!r}{hint}")


def _unique(found: list[ImageNetClass]) -> list[ImageNetClass]:
    return list({c.index: c for c in found}.values())
