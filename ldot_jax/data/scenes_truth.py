"""Whether a scenes caption is true of a scene: the generator's own judgement.

Scenes captions often fit several images ("a red circle" fits every scene with one), so R@1
against the one image a caption was written for is low for every method. A caption is *true*
of a scene when the caption grammar (data/scenes.py) could have produced it for that scene:
  relation   "<a> <left of | to the left of | above | over | …> <b>": two different objects
             matching the phrases whose clearest relation (`scenes.relation`) is that one;
  partial    "<a>", "a picture with <a>", "<a> in the scene", "<a> on a dark background":
             some object matches;
  count      "[there is | there are] <group>, <group> and <group>", groups "two red circles"
             or "a red circle": the scene's (colour, shape) groups are exactly these, with
             these counts;
  count all  "three objects colored blue and red": that many objects, exactly those colours.
A phrase "[a | an] [size] <colour> <shape word>" matches an object of that colour and shape
(any synonym) and, when a size word is given, that size. A string two makers could write is
true if either reading holds. `parse` refuses text outside the grammar (ValueError), so a
changed generator cannot silently make every caption false.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Sequence

import numpy as np

from ldot_jax.data import scenes

_ARTICLE = r"(?:an? )"
# What a caption asks for (Caption.kind): what a caption-true recall breaks down by.
KINDS = ("partial", "count", "count_all", "relation")


@functools.cache
def _vocabulary():
    """Word → meaning tables, from the generator's own lists."""
    nouns = {w: shape for shape, words in scenes.SHAPE_WORDS.items() for w in words}
    plurals = {scenes.plural(w): shape for w, shape in nouns.items()}
    sizes = {w: size for size, words in scenes.SIZE_WORDS.items() for w in words}
    relations = {w: rel for rel, words in scenes.RELATIONS.items() for w in words}
    numbers = {w: n for n, w in enumerate(scenes.NUMBERS)}
    alt = lambda words: "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    colors = alt(scenes.COLORS)
    phrase = rf"{_ARTICLE}?(?:({alt(sizes)}) )?({colors}) ({alt(nouns)})"
    return {
        "nouns": nouns, "plurals": plurals, "sizes": sizes, "relations": relations,
        "numbers": numbers,
        "relation": re.compile(rf"^{phrase} ({alt(relations)}) {phrase}$"),
        "partial": re.compile(rf"^(?:a picture with )?{phrase}"
                              rf"(?: on a dark background| in the scene)?$"),
        "count_all": re.compile(rf"^({alt(numbers)}) objects? colored (.+)$"),
        "group": re.compile(rf"^(?:({alt(numbers)}) ({colors}) ({alt(plurals)})"
                            rf"|{_ARTICLE}({colors}) ({alt(nouns)}))$"),
    }


@dataclasses.dataclass(frozen=True)
class Phrase:
    color: str
    shape: str
    size: str | None = None

    def matches(self, obj) -> bool:
        return (obj.color == self.color and obj.shape == self.shape
                and self.size in (None, obj.size))


@dataclasses.dataclass(frozen=True)
class Caption:
    """The readings of one caption (any that holds makes it true)."""

    text: str
    relation: tuple | None = None        # (Phrase a, relation, Phrase b)
    partial: Phrase | None = None
    groups: tuple | None = None          # sorted ((colour, shape, count), …)
    groups_lead: str | None = None       # "there is" / "there are" / None
    count_all: tuple | None = None       # (count, sorted colours)

    @property
    def kind(self) -> str:
        """Which of KINDS the caption is, to break recall down by what it asks for: a
        relation; a count of all objects by colour; one object named ("partial", also when
        it reads as a one-group count too: "a red circle"); else a count of groups."""
        if self.relation is not None:
            return "relation"
        if self.count_all is not None:
            return "count_all"
        return "partial" if self.partial is not None else "count"

    def holds(self, objects: Sequence) -> bool:
        """Whether the caption is true of a scene (a list of scenes.SceneObject)."""
        if self.partial is not None and any(self.partial.matches(o) for o in objects):
            return True
        if self.relation is not None:
            a, rel, b = self.relation
            if any(i != j and a.matches(x) and b.matches(y) and scenes.relation(x, y) == rel
                   for i, x in enumerate(objects) for j, y in enumerate(objects)):
                return True
        if self.groups is not None and _groups(objects) == self.groups:
            lead = self.groups_lead
            if lead is None or lead == ("there is" if len(objects) == 1 else "there are"):
                return True
        if self.count_all is not None:
            count, colors = self.count_all
            if len(objects) == count and tuple(sorted({o.color for o in objects})) == colors:
                return True
        return False


def _groups(objects) -> tuple:
    counts: dict[tuple[str, str], int] = {}
    for o in objects:
        counts[(o.color, o.shape)] = counts.get((o.color, o.shape), 0) + 1
    return tuple(sorted((color, shape, n) for (color, shape), n in counts.items()))


def _phrase(groups, offset: int = 0) -> Phrase:
    size, color, noun = groups[offset:offset + 3]
    v = _vocabulary()
    return Phrase(color, v["nouns"][noun], v["sizes"][size] if size else None)


def _listed(text: str) -> list[str]:
    """"a, b and c" → ["a", "b", "c"] (how captions list groups and colours)."""
    head, _, last = text.rpartition(" and ")
    return (head.split(", ") + [last]) if head else [text]


def _parse_groups(text: str):
    """The count maker's reading: (lead, sorted groups) or None."""
    v = _vocabulary()
    lead = None
    for candidate in ("there is ", "there are "):
        if text.startswith(candidate):
            lead, text = candidate.strip(), text[len(candidate):]
    parts = _listed(text)
    if lead is not None and len(parts) != 1:
        return None
    groups = []
    for part in parts:
        found = v["group"].match(part)
        if not found:
            return None
        number, color, plural, single_color, noun = found.groups()
        if number is not None:
            count = v["numbers"][number]
            if count < 2:
                return None
            groups.append((color, v["plurals"][plural], count))
        else:
            groups.append((single_color, v["nouns"][noun], 1))
    return lead, tuple(sorted(groups))


def _parse_count_all(text: str):
    v = _vocabulary()
    found = v["count_all"].match(text)
    if not found:
        return None
    colors = _listed(found.group(2))
    if any(c not in scenes.COLORS for c in colors):
        return None
    return v["numbers"][found.group(1)], tuple(sorted(colors))


@functools.lru_cache(maxsize=65536)
def parse(text: str) -> Caption:
    """The readings of a caption; ValueError naming it if no maker could have written it."""
    v = _vocabulary()
    relation = partial = None
    found = v["relation"].match(text)
    if found:
        g = found.groups()
        relation = (_phrase(g, 0), v["relations"][g[3]], _phrase(g, 4))
    found = v["partial"].match(text)
    if found:
        partial = _phrase(found.groups())
    counted = _parse_groups(text)
    count_all = _parse_count_all(text)
    if relation is partial is counted is count_all is None:
        raise ValueError(f"scenes caption {text!r} is not one the generator writes")
    return Caption(text, relation, partial, counted[1] if counted else None,
                   counted[0] if counted else None, count_all)


def kinds(captions: Sequence[str]) -> np.ndarray:
    """str[T]: each caption's Caption.kind (one of KINDS)."""
    return np.array([parse(c).kind for c in captions], dtype=object)


def truth(captions: Sequence[str], objects: Sequence[Sequence]) -> np.ndarray:
    """bool[T, N]: caption t is true of scene n (objects[n]: its list of SceneObject)."""
    parsed = [parse(c) for c in captions]
    return np.array([[p.holds(scene) for scene in objects] for p in parsed], bool)


def split_objects(settings, split: str, count: int) -> list[list]:
    """The objects of images 0..count-1 of a generated scenes split (regenerated from the
    builder settings' seed; nothing is rendered). `settings`: a ScenesBuilderConfig or the
    settings dict a prepared dataset stores."""
    get = settings.get if isinstance(settings, dict) else lambda k: getattr(settings, k)
    config = scenes.ScenesConfig(max_objects=get("max_objects"),
                                 hard_fraction=get("hard_fraction"))
    return [scenes.scene_objects(get("seed"), split, index, config)[0]
            for index in range(count)]
