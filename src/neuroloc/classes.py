"""Class lists (ImageNet-1k's, a model's own from a names file, or numbered) and lookup of a target class
by index, WordNet id or name."""

from __future__ import annotations

import csv
import difflib
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path


class ClassLookupError(ValueError):
    """An unknown or ambiguous class."""


@dataclass(frozen=True)
class ClassInfo:
    """One output of a classifier: its index, its WordNet id (ImageNet classes; None for a model's own
    classes) and its name (for ImageNet, all synonyms, comma separated, as in the ILSVRC metadata)."""

    index: int
    synset: str | None
    name: str

    @property
    def short_name(self) -> str:
        return short_class_name(self.name, self.synset)


def short_class_name(name: str, synset: str | None) -> str:
    """An ImageNet class's first synonym (``tabby`` of ``tabby, tabby cat``); a model's own class (no WordNet id) by
    its whole name, a line that may hold commas."""
    return name.split(",")[0].strip() if synset else name


ClassList = tuple[ClassInfo, ...]
IMAGENET_CLASS_COUNT = 1000
MAX_CLASS_NAME_LENGTH = 200


@cache
def imagenet_classes() -> ClassList:
    """The 1000 classes in the standard sorted-WNID order (label index = position)."""
    text = resources.files("neuroloc").joinpath("data/imagenet_classes.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(text.splitlines()))
    classes = tuple(ClassInfo(int(r["label"]), r["synset"], r["name"]) for r in rows)
    assert [c.index for c in classes] == list(range(len(classes)))
    return classes


def numbered_classes(count: int) -> ClassList:
    """Names for a model's own ``count`` classes when none are given: ``class_0`` .. ``class_{count-1}``."""
    return tuple(ClassInfo(i, None, f"class_{i}") for i in range(count))


def read_class_names(path: str | Path) -> ClassList:
    """A model's own class names from a text file: one name per line, line i naming output i (the
    ``labels.txt`` / ``classes.txt`` that training code writes). Trailing blank lines are ignored.

    Raises:
        ClassLookupError: for a missing, unreadable or empty file, a blank line between names, a name
            that is too long or a repeated name.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ClassLookupError(f"{path}: no such class-names file") from None
    except UnicodeDecodeError as exc:
        raise ClassLookupError(f"{path}: not UTF-8 text (byte {exc.start}); save the class names as UTF-8") from None
    except OSError as exc:
        raise ClassLookupError(f"{path}: cannot read the class names ({type(exc).__name__}: {exc})") from None
    # lines end at \n, \r\n or \r only: str.splitlines would also split at \v, \x1c-\x1e, \x85 and U+2028, and
    # shift every name after one against the line an editor shows
    names = [line.strip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise ClassLookupError(f"{path}: no class names (one per line, line i naming output i)")
    seen: dict[str, int] = {}
    for line, name in enumerate(names, start=1):
        if not name:
            raise ClassLookupError(f"{path}: line {line} is blank; every output needs a name (one per line)")
        if len(name) > MAX_CLASS_NAME_LENGTH:
            raise ClassLookupError(f"{path}: line {line} is longer than {MAX_CLASS_NAME_LENGTH} characters")
        if name.lower() in seen:
            raise ClassLookupError(f"{path}: line {line} repeats the name {name!r} of line {seen[name.lower()]}")
        seen[name.lower()] = line
    return tuple(ClassInfo(i, None, name) for i, name in enumerate(names))


def named_classes(names: Sequence[str]) -> ClassList:
    """A model's own classes from their names, in output order.

    Raises:
        ClassLookupError: for an empty or repeated name (case-insensitive).
    """
    cleaned = [str(n).strip() for n in names]
    if not all(cleaned) or len({n.lower() for n in cleaned}) != len(cleaned):
        raise ClassLookupError("class names must be non-empty and different from each other")
    return tuple(ClassInfo(i, None, n) for i, n in enumerate(cleaned))


def classes_for(count: int, names: ClassList | None = None) -> ClassList:
    """The class list of a model with ``count`` outputs: ``names`` when given (their number must match),
    ImageNet-1k's for 1000 outputs, else numbered names.

    Raises:
        ClassLookupError: when ``names`` does not name every output.
    """
    if names is not None:
        if len(names) != count:
            raise ClassLookupError(f"{len(names)} class names for a model with {count} outputs")
        return names
    return imagenet_classes() if count == IMAGENET_CLASS_COUNT else numbered_classes(count)


@cache
def unique_class_names() -> dict[int, str]:
    """Each ImageNet-1k class's name in files for other tools: its first synonym, plus its WordNet id where
    another class has that synonym too (two classes are called *crane*)."""
    classes = imagenet_classes()
    uses = Counter(c.short_name for c in classes)
    return {c.index: c.short_name if uses[c.short_name] == 1 else f"{c.short_name} ({c.synset})" for c in classes}


def recorded_class(prediction: dict) -> ClassInfo:
    """The class of a prediction as ``neuroloc localize`` writes it: an ImageNet class when it has a WordNet id
    (``synset``) or no name, else one of the model's own classes, under the name it carries.

    Raises:
        ClassLookupError: for a label that is not a class index, or not an ImageNet-1k one where it should be.
    """
    label, synset, name = prediction.get("label"), prediction.get("synset"), prediction.get("name")
    if "label" not in prediction:
        raise ClassLookupError("no \"label\" (the class index)")
    if not isinstance(label, int) or isinstance(label, bool) or label < 0:
        raise ClassLookupError(f"\"label\" is not a class index: {label!r}")
    if synset is None and isinstance(name, str) and name.strip():
        return ClassInfo(label, None, name.strip())
    if label >= IMAGENET_CLASS_COUNT:
        raise ClassLookupError(f"\"label\" is not an ImageNet-1k class index: {label!r}")
    return imagenet_classes()[label]


def split_class_list(text: str, classes: ClassList) -> list[str]:
    """The class names of a comma-separated list (``--classes``). A class's whole name, commas and all, as
    predictions carry it (``maillot, tank suit``), stays one name, as written: the longest run of parts that is one
    is taken."""
    raw = text.split(",")
    # a model's own name is given back as the model spells it (resolve_class matches it as written)
    whole = {_spaced(c.name): (None if c.synset else c.name.strip()) for c in classes if "," in c.name}
    names, start = [], 0
    while start < len(raw):
        end = next((end for end in range(len(raw), start + 1, -1) if _spaced(",".join(raw[start:end])) in whole),
                   start + 1)
        written = ",".join(raw[start:end]).strip()
        names.append(whole.get(_spaced(written)) or written)
        start = end
    return [name for name in names if name]


def _spaced(name: str) -> str:
    """A comma-separated list of synonyms, lower case, spaced one way (``"chow,chow chow"`` = ``"Chow, chow chow"``)."""
    return ", ".join(" ".join(part.split()) for part in name.lower().split(","))


def resolve_class(query: str | int, classes: ClassList | None = None) -> ClassInfo:
    """A class from its index (``281``), WordNet id (``n02123045``) or name (``tabby``, case-insensitive).

    A name must match one synonym exactly or, failing that, be the start of synonyms of one class only, and
    a word of no other class's synonym. Raises ClassLookupError listing the candidates when it is ambiguous
    or unknown.
    """
    classes = classes or imagenet_classes()
    text = str(query).strip()
    if not text:
        raise ClassLookupError("empty class name")
    own_named = [c for c in classes if isinstance(query, str) and c.synset is None and c.name.strip().lower() == text.lower()]
    if len(own_named) == 1:  # a model's own class by its whole name, even one like "20" or "defect, minor"
        return own_named[0]
    if text.lstrip("-").isdigit():
        index = int(text)
        if not 0 <= index < len(classes):
            raise ClassLookupError(f"class index {index} out of range 0..{len(classes) - 1}")
        return classes[index]
    by_synset = {c.synset.lower(): c for c in classes if c.synset}
    if text.lower() in by_synset:  # n02123045 or N02123045
        return by_synset[text.lower()]
    whole = _unique([c for c in classes if c.synset and _spaced(c.name) == _spaced(text)]) if "," in text else []
    if len(whole) == 1:  # an ImageNet class by all its synonyms, as results lines name it: "chow, chow chow"
        return whole[0]
    named = re.fullmatch(r"(.+) \((n\d{8})\)", text)  # "crane (n03126707)": how exports name a shared name
    if named and named.group(2).lower() in by_synset:
        return by_synset[named.group(2).lower()]
    wanted = text.lower()
    # ImageNet's names list synonyms between commas; a model's own class name is one name, commas and all
    synonyms = [(s.strip().lower(), c) for c in classes for s in (c.name.split(",") if c.synset else [c.name])]
    exact = _unique([c for s, c in synonyms if s == wanted])
    if len(exact) == 1:
        return exact[0]
    # a name that starts a synonym, and the classes that hold it as a word of a longer name: "dog" is not
    # "dog sled" alone but also "hot dog", "Eskimo dog", "prairie dog" ...
    word = re.compile(rf"(?<![a-z0-9]){re.escape(wanted)}(?![a-z0-9])")
    candidates = exact or _unique([c for s, c in synonyms if s.startswith(wanted)] + [c for s, c in synonyms if word.search(s)])
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        listed = "; ".join(f"{c.index} {c.synset or ''} ({c.short_name})".replace("  (", " (") for c in candidates[:8])
        more = f" and {len(candidates) - 8} more" if len(candidates) > 8 else ""
        raise ClassLookupError(f"class name {text!r} is ambiguous: {listed}{more}. Give the index"
                               + (" or WordNet id" if candidates[0].synset else ""))
    close = difflib.get_close_matches(wanted, [s for s, _ in synonyms], n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise ClassLookupError(f"unknown class {text!r}{hint}")


def inexact_name(query: str | int, found: ClassInfo) -> bool:
    """Whether ``query`` named ``found`` by part of a name (a prefix) rather than by its index, WordNet id or one
    of its names in full: worth telling the user which class it was taken as."""
    text = str(query).strip().lower()
    if text.lstrip("-").isdigit() or (found.synset and found.synset.lower() in text):
        return False
    if _spaced(text) == _spaced(found.name):  # the whole name, as predictions carry it
        return False
    return text not in {s.strip().lower() for s in (found.name.split(",") if found.synset else [found.name])}


def _unique(found: list[ClassInfo]) -> list[ClassInfo]:
    return list({c.index: c for c in found}.values())
