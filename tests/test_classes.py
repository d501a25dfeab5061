"""Lookup of the target class by index, WordNet id or name."""

from __future__ import annotations

import re

import pytest

from neuroloc.classes import ClassLookupError, imagenet_classes, resolve_class


def test_the_1000_classes_in_wnid_order():
    classes = imagenet_classes()
    assert len(classes) == 1000
    assert [c.index for c in classes] == list(range(1000))
    assert [c.synset for c in classes] == sorted(c.synset for c in classes)
    assert classes[0].synset == "n01440764" and classes[0].short_name == "tench"
    assert classes[281].synset == "n02123045"


@pytest.mark.parametrize("query", [281, "281", " 281 ", "n02123045", "N02123045", "tabby (n02123045)", "tabby", "TABBY", " Tabby ", "tabby cat", "Tabby Cat"])
def test_tabby_by_index_wnid_and_name(query):
    found = resolve_class(query)
    assert (found.index, found.synset, found.short_name) == (281, "n02123045", "tabby")


def test_every_imagenet_class_by_its_whole_name_as_results_lines_give_it():
    for c in imagenet_classes():
        if "," in c.name:  # one-word names stay as before: "maillot" alone is still ambiguous
            assert resolve_class(c.name) == c, c
    assert resolve_class("Chow,chow  chow").index == 260  # spaced and cased otherwise
    with pytest.raises(ClassLookupError, match="ambiguous"):
        resolve_class("maillot")


def test_unique_prefix():
    assert resolve_class("tabb").index == 281


def test_ambiguous_name_lists_every_candidate():
    with pytest.raises(ClassLookupError, match="ambiguous") as info:
        resolve_class("crane")
    message = str(info.value)
    assert "134" in message and "n02012849" in message  # the bird
    assert "517" in message and "n03126707" in message  # the machine
    with pytest.raises(ClassLookupError, match="ambiguous"):
        resolve_class("Crane")


def test_a_word_that_several_class_names_hold_is_ambiguous_not_the_one_it_starts():
    """"dog" starts only "dog sled", but "hot dog", "Eskimo dog" and the breeds hold it too."""
    with pytest.raises(ClassLookupError, match="ambiguous") as info:
        resolve_class("dog")
    assert "537" in str(info.value) and "dogsled" in str(info.value)
    assert re.search(r"\) and \d+ more\. Give the index", str(info.value))  # eight are listed; the rest are counted
    assert resolve_class("pig").index == 341 and resolve_class("golden").index == 207  # a name, a unique start


def test_a_class_named_by_part_of_a_name_is_told():
    from neuroloc.classes import inexact_name

    tabby = resolve_class(281)
    assert inexact_name("tabb", tabby) and inexact_name("star", resolve_class("star"))
    assert not any(inexact_name(q, tabby) for q in ("281", "n02123045", "Tabby Cat", "tabby (n02123045)"))


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ClassLookupError, match="unknown class") as info:
        resolve_class("tabbby")
    assert "tabby" in str(info.value)
    with pytest.raises(ClassLookupError, match="unknown class"):
        resolve_class("qqqqqqqqqq")


@pytest.mark.parametrize("index", [1000, -1, "1000", 123456])
def test_index_out_of_range(index):
    with pytest.raises(ClassLookupError, match="out of range"):
        resolve_class(index)


def test_lookup_error_is_a_value_error():
    assert issubclass(ClassLookupError, ValueError)
