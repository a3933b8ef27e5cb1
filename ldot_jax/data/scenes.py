"""The built-in "scenes" dataset: procedural captioned images with detector-like regions.

Each image holds 1–4 objects (shape, colour, size, position) drawn on a textured background.
Per image:
  - `image`: the rendered RGB picture, uint8[S, S, 3] (S = `image_size`);
  - regions, as a detector gives them: one per object (its box jittered) plus distractors
    (background patches and partial-object crops). `region_feat` f32[n, feat_dim] is computed
    from the PIXELS of each region's crop — an 8×8 colour thumbnail and edge statistics through
    a fixed seeded projection, a ReLU and noise — never from the labels; `boxes` f32[n, 7] are
    `[x1, y1, x2, y2, w, h, w*h]` in [0, 1]; `soft_labels` f32[n, C] a noisy distribution over
    the detector classes (0 = background, then every colour × shape), as MRC-kl needs;
  - 5 captions from a grammar with synonyms that mentions attributes, counts and spatial
    relations, some of them only part of the scene ("a small red circle left of a blue
    square", "two green triangles above a star").
Hard cases on purpose: a fraction of images come with a twin that differs only by a swapped
relation (the objects trade places) or a swapped colour–shape binding, so a cross-encoder has
something to win over a dual encoder.

Everything is a function of (seed, split, index): generation is deterministic and any record
can be regenerated alone.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
SHAPE_WORDS = {"circle": ("circle", "disc", "ring"), "square": ("square", "box", "block"),
               "triangle": ("triangle",), "star": ("star",),
               "diamond": ("diamond", "rhombus"), "cross": ("cross", "plus sign")}
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230),
          "yellow": (235, 215, 40), "purple": (150, 60, 190), "orange": (245, 140, 30)}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
NUMBERS = ("zero", "one", "two", "three", "four")
RELATIONS = {"left": ("left of", "to the left of"), "right": ("right of", "to the right of"),
             "above": ("above", "over"), "below": ("below", "under")}
NUM_CLASSES = 1 + len(SHAPES) * len(COLORS)  # 0 = background
THUMB = 8  # crop thumbnail side


@dataclasses.dataclass(frozen=True)
class ScenesConfig:
    """Generation settings. `feat_dim` is the region feature dimension; `hard_fraction` the
    share of images generated as twins of the previous one."""

    image_size: int = 64
    feat_dim: int = 256
    captions_per_image: int = 5
    max_objects: int = 4
    hard_fraction: float = 0.25
    feature_noise: float = 0.05
    projection_seed: int = 1234


@dataclasses.dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    x: float  # centre, [0, 1]
    y: float
    radius: float

    @property
    def class_id(self) -> int:
        return 1 + SHAPES.index(self.shape) * len(COLORS) + list(COLORS).index(self.color)

    def box(self) -> np.ndarray:
        r = self.radius
        return np.clip([self.x - r, self.y - r, self.x + r, self.y + r], 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Layout


def _record_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def sample_objects(rng: np.random.Generator, max_objects: int) -> list[SceneObject]:
    """1..max_objects objects that do not overlap much."""
    count = int(rng.integers(1, max_objects + 1))
    objects: list[SceneObject] = []
    for _ in range(50 * count):
        if len(objects) == count:
            break
        size = "large" if rng.random() < 0.5 else "small"
        radius = float(rng.uniform(0.13, 0.17) if size == "large" else rng.uniform(0.07, 0.09))
        x, y = rng.uniform(radius, 1 - radius, size=2)
        if all(np.hypot(x - o.x, y - o.y) > 0.9 * (radius + o.radius) for o in objects):
            # Same colour and shape twice is allowed: captions then count them.
            shape = SHAPES[rng.integers(len(SHAPES))]
            color = list(COLORS)[rng.integers(len(COLORS))]
            objects.append(SceneObject(shape, color, size, float(x), float(y), radius))
    return objects


def make_twin(objects: list[SceneObject], rng: np.random.Generator) -> list[SceneObject] | None:
    """A hard negative of a scene: two objects trade places (relation swap) or trade colours
    (binding swap). None if the scene has no two distinguishable objects."""
    pairs = [(i, j) for i in range(len(objects)) for j in range(i + 1, len(objects))
             if (objects[i].shape, objects[i].color) != (objects[j].shape, objects[j].color)]
    if not pairs:
        return None
    i, j = pairs[rng.integers(len(pairs))]
    a, b = objects[i], objects[j]
    twin = list(objects)
    if a.color != b.color and a.shape != b.shape and rng.random() < 0.5:
        twin[i], twin[j] = (dataclasses.replace(a, color=b.color),
                            dataclasses.replace(b, color=a.color))
    else:
        twin[i], twin[j] = (dataclasses.replace(a, x=b.x, y=b.y),
                            dataclasses.replace(b, x=a.x, y=a.y))
    return twin


# ---------------------------------------------------------------------------------------------
# Rendering


def _shape_mask(shape: str, dx, dy, r):
    """bool mask of a shape of radius r centred at 0 on coordinate grids dx, dy."""
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= r ** 2
    if shape == "square":
        return (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "cross":
        return (((np.abs(dx) <= 0.3 * r) & (np.abs(dy) <= r))
                | ((np.abs(dy) <= 0.3 * r) & (np.abs(dx) <= r)))
    if shape == "triangle":  # pointing up: y grows downwards in images
        return (dy <= 0.8 * r) & (dy >= -r + 2 * np.abs(dx))
    if shape == "star":
        angle = np.arctan2(dy, dx)
        bound = r * (0.55 + 0.45 * np.cos(5 * (angle + np.pi / 2)) ** 8)
        return np.hypot(dx, dy) <= bound
    raise ValueError(f"unknown shape {shape!r}; shapes are {SHAPES}")


def render(objects: list[SceneObject], size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8[size, size, 3]: objects on a noisy dark background, with slight colour noise."""
    grid = (np.arange(size) + 0.5) / size
    xs, ys = np.meshgrid(grid, grid)
    canvas = 30 + 12 * rng.random((size, size, 1)) + rng.normal(0, 4, (size, size, 3))
    for obj in objects:
        mask = _shape_mask(obj.shape, xs - obj.x, ys - obj.y, obj.radius)
        tint = np.asarray(COLORS[obj.color]) + rng.normal(0, 10, 3)
        canvas[mask] = tint + rng.normal(0, 6, (mask.sum(), 3))
    return np.clip(canvas, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Regions


def region_boxes(objects, rng):
    """(boxes f32[n, 4] as x1,y1,x2,y2, kinds list of (kind, object index)) for the objects'
    jittered boxes, 1–2 background patches and sometimes a partial crop of an object."""
    boxes, kinds = [], []
    for k, obj in enumerate(objects):
        r = obj.radius
        jitter = rng.normal(0, 0.08 * r, 4)
        boxes.append(np.clip(obj.box() + jitter, 0, 1))
        kinds.append(("object", k))
    for _ in range(int(rng.integers(1, 3))):
        w, h = rng.uniform(0.1, 0.3, 2)
        x, y = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
        boxes.append(np.array([x, y, x + w, y + h]))
        kinds.append(("background", -1))
    if objects and rng.random() < 0.6:
        k = int(rng.integers(len(objects)))
        x1, y1, x2, y2 = objects[k].box()
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        part = [(x1, y1, cx, cy), (cx, y1, x2, cy), (x1, cy, cx, y2), (cx, cy, x2, y2)]
        boxes.append(np.array(part[rng.integers(4)]))
        kinds.append(("partial", k))
    return np.asarray(boxes, np.float32), kinds


def thumbnails(image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """f32[n, THUMB, THUMB, 3] in [0, 1]: each box's crop resampled (nearest) to THUMB²."""
    size = image.shape[0]
    out = np.empty((len(boxes), THUMB, THUMB, 3), np.float32)
    steps = (np.arange(THUMB) + 0.5) / THUMB
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        cols = np.clip(((x1 + (x2 - x1) * steps) * size).astype(int), 0, size - 1)
        rows = np.clip(((y1 + (y2 - y1) * steps) * size).astype(int), 0, size - 1)
        out[i] = image[rows[:, None], cols[None, :]] / 255.0
    return out


class FeatureProjection:
    """The fixed "detector": thumbnail pixels and edge energies → ReLU(W·x + b) + noise.

    W and b come from `projection_seed` alone, so features are comparable across splits and
    runs; the noise comes from the record's generator.
    """

    def __init__(self, feat_dim: int, seed: int, noise: float):
        inputs = THUMB * THUMB * 3 + 2 * 3
        rng = np.random.default_rng(seed)
        self.weight = (rng.normal(0, 1, (inputs, feat_dim)) / np.sqrt(inputs)).astype(np.float32)
        self.bias = rng.normal(0, 0.1, feat_dim).astype(np.float32)
        self.noise = noise

    def __call__(self, thumbs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """thumbs f32[n, T, T, 3] → f32[n, feat_dim]."""
        centred = thumbs - thumbs.mean(axis=(1, 2), keepdims=True)
        edges = np.concatenate([np.abs(np.diff(thumbs, axis=1)).mean(axis=(1, 2)),
                                np.abs(np.diff(thumbs, axis=2)).mean(axis=(1, 2))], axis=-1)
        x = np.concatenate([centred.reshape(len(thumbs), -1) * 4 + thumbs.reshape(
            len(thumbs), -1), edges * 8], axis=-1)
        features = np.maximum(x @ self.weight + self.bias, 0.0)
        return (features + rng.normal(0, self.noise, features.shape)).astype(np.float32)


def soft_labels(kinds, objects, rng) -> np.ndarray:
    """f32[n, NUM_CLASSES]: peaked on the region's class (background for background patches,
    lower confidence for partial crops), with mass leaking to similar classes."""
    labels = np.empty((len(kinds), NUM_CLASSES), np.float32)
    for i, (kind, k) in enumerate(kinds):
        logits = rng.normal(0, 0.5, NUM_CLASSES)
        if kind == "background":
            logits[0] += 6.0
        else:
            obj = objects[k]
            confidence = 6.0 if kind == "object" else 2.5
            logits[obj.class_id] += confidence
            shape_row = 1 + SHAPES.index(obj.shape) * len(COLORS)
            logits[shape_row:shape_row + len(COLORS)] += 1.0  # same shape, other colours
            logits[0] += 1.0 if kind == "partial" else 0.0
        probs = np.exp(logits - logits.max())
        labels[i] = probs / probs.sum()
    return labels


# ---------------------------------------------------------------------------------------------
# Captions


def plural(word: str) -> str:
    """The plural of a shape word, as captions write it."""
    return {"box": "boxes", "cross": "crosses", "plus sign": "plus signs"}.get(word, word + "s")


def _noun(obj: SceneObject, rng, plural_form=False) -> str:
    word = SHAPE_WORDS[obj.shape][rng.integers(len(SHAPE_WORDS[obj.shape]))]
    return plural(word) if plural_form else word


def _phrase(obj: SceneObject, rng, with_size=None, article=True) -> str:
    with_size = rng.random() < 0.4 if with_size is None else with_size
    parts = []
    if with_size:
        words = SIZE_WORDS[obj.size]
        parts.append(words[rng.integers(len(words))])
    parts += [obj.color, _noun(obj, rng)]
    text = " ".join(parts)
    return (("an " if text[0] in "aeiou" else "a ") + text) if article else text


def relation(a: SceneObject, b: SceneObject) -> str | None:
    """The clearest spatial relation of a to b ("left", "right", "above", "below") or None."""
    dx, dy = b.x - a.x, b.y - a.y
    if max(abs(dx), abs(dy)) < 0.12:
        return None
    if abs(dx) >= abs(dy):
        return "left" if dx > 0 else "right"
    return "above" if dy > 0 else "below"


def _relation_caption(objects, rng):
    pairs = [(i, j) for i in range(len(objects)) for j in range(len(objects))
             if i != j and relation(objects[i], objects[j])]
    if not pairs:
        return None
    i, j = pairs[rng.integers(len(pairs))]
    words = RELATIONS[relation(objects[i], objects[j])]
    return (f"{_phrase(objects[i], rng)} {words[rng.integers(len(words))]} "
            f"{_phrase(objects[j], rng)}")


def _count_caption(objects, rng):
    groups: dict[tuple[str, str], list[SceneObject]] = {}
    for obj in objects:
        groups.setdefault((obj.color, obj.shape), []).append(obj)
    parts = []
    for (color, _), members in groups.items():
        n = len(members)
        parts.append(f"{NUMBERS[n]} {color} {_noun(members[0], rng, plural_form=True)}" if n > 1
                     else _phrase(members[0], rng, with_size=False))
    if len(parts) == 1:
        lead = ("there is " if len(objects) == 1 else "there are ") if rng.random() < 0.5 else ""
        return lead + parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _partial_caption(objects, rng):
    obj = objects[rng.integers(len(objects))]
    templates = ("{} on a dark background", "a picture with {}", "{} in the scene", "{}")
    return templates[rng.integers(len(templates))].format(_phrase(obj, rng))


def _count_all_caption(objects, rng):
    n = len(objects)
    noun = "object" if n == 1 else "objects"
    colors = sorted({o.color for o in objects})
    listed = colors[0] if len(colors) == 1 else ", ".join(colors[:-1]) + " and " + colors[-1]
    return f"{NUMBERS[n]} {noun} colored {listed}"


def captions(objects: list[SceneObject], count: int, rng: np.random.Generator) -> list[str]:
    """`count` distinct-if-possible captions of a scene."""
    makers = [_relation_caption, _count_caption, _partial_caption, _relation_caption,
              _count_all_caption, _partial_caption]
    out: list[str] = []
    for attempt in range(8 * count):  # makers in turn; a repeat is accepted only late
        if len(out) == count:
            break
        text = makers[attempt % len(makers)](objects, rng)
        if text and (text not in out or attempt >= 6 * count):
            out.append(text)
    while len(out) < count:
        out.append(_count_caption(objects, rng))
    return out


# ---------------------------------------------------------------------------------------------
# Records


def scene_objects(seed: int, split: str, index: int,
                  config: ScenesConfig) -> tuple[list[SceneObject], str]:
    """(objects, twin_of) of one image: odd indices may be hard twins of index - 1 (with
    probability `hard_fraction`); twin_of is the original's image_id for twins, else ""."""
    rng = _record_rng(seed, split, index)
    if index % 2 == 1 and rng.random() < 2 * config.hard_fraction:
        twin = make_twin(sample_objects(_record_rng(seed, split, index - 1),
                                        config.max_objects), rng)
        if twin is not None:
            return twin, f"{split}_{index - 1:06d}"
    return sample_objects(_record_rng(seed, split, index), config.max_objects), ""


def scene_captions(seed: int, split: str, index: int, config: ScenesConfig,
                   objects: list[SceneObject] | None = None) -> list[str]:
    """The captions of one image. They have their own random stream, so a vocabulary can be
    trained on a split's captions without rendering anything."""
    if objects is None:
        objects = scene_objects(seed, split, index, config)[0]
    return captions(objects, config.captions_per_image, _record_rng(seed, split + "#text", index))


def generate_record(seed: int, split: str, index: int, config: ScenesConfig,
                    projection: FeatureProjection | None = None) -> dict:
    """One image with its regions and captions, a pure function of (seed, split, index).

    Returns a dict: image_id (str), image uint8[S, S, 3], region_feat f32[n, feat_dim],
    boxes f32[n, 7], soft_labels f32[n, C], captions (list of str), objects (list of dicts),
    twin_of (image_id of the original for hard twins, else "").
    """
    projection = projection or FeatureProjection(config.feat_dim, config.projection_seed,
                                                 config.feature_noise)
    objects, twin_of = scene_objects(seed, split, index, config)
    rng = _record_rng(seed, split + "#pixels", index)
    image = render(objects, config.image_size, rng)
    corners, kinds = region_boxes(objects, rng)
    order = rng.permutation(len(kinds))  # detectors do not list objects first
    corners, kinds = corners[order], [kinds[i] for i in order]
    w, h = corners[:, 2] - corners[:, 0], corners[:, 3] - corners[:, 1]
    boxes = np.concatenate([corners, w[:, None], h[:, None], (w * h)[:, None]], axis=1)
    return {
        "image_id": f"{split}_{index:06d}",
        "image": image,
        "region_feat": projection(thumbnails(image, corners), rng),
        "boxes": boxes.astype(np.float32),
        "soft_labels": soft_labels(kinds, objects, rng),
        "captions": scene_captions(seed, split, index, config, objects),
        "objects": [dataclasses.asdict(o) for o in objects],
        "twin_of": twin_of,
    }


def generate_chunk(job: tuple) -> list[dict]:
    """Records [start, stop) of a split, as datasets store them: `job` is (seed, split, start,
    stop, config, image_size); the picture is average-pooled to image_size (0 drops it) and the
    generation-only keys (objects, twin_of) are left out."""
    seed, split, start, stop, config, image_size = job
    projection = FeatureProjection(config.feat_dim, config.projection_seed,
                                   config.feature_noise)
    out = []
    for index in range(start, stop):
        record = generate_record(seed, split, index, config, projection)
        del record["objects"], record["twin_of"]
        image = record.pop("image")
        if image_size:
            f = config.image_size // image_size
            record["image"] = image.reshape(image_size, f, image_size, f, 3).mean(
                axis=(1, 3)).round().astype(np.uint8)
        out.append(record)
    return out
