"""The slow stage: a jitted UNITER cross-encoder that re-scores the fast stage's candidates.

    images = rerank.ImageStore.from_records(dataset.split("test"))        # row i = image i
    captions = rerank.CaptionStore.from_captions(captions)               # row t = caption t
    reranker = rerank.CrossEncoderReranker(model, params, images, captions, mesh=mesh)
    reranker.warmup()                                                      # every program, now
    retriever = Retriever.load(workdir, reranker=reranker, rerank_top=20)

`CrossEncoderReranker` implements `retrieval.Reranker`: the Q × M (query, candidate) pairs
are flattened, sorted by caption length (so a batch pads to a small text bucket), and scored
in batches of exactly `pairs_per_batch` pairs, `R` regions (the store's) and a text length
from `text_buckets`. Those are the only shapes the jitted scorer ever sees, so it compiles at
most len(text_buckets) programs, all of them in `warmup()`. With a mesh the params are
replicated and every pair batch is split over the data axis: pairs_per_batch@data.

Scores: head "rank" is UNITER's re-ranking logit (LightningDOT re-ranks with it), "itm" the
ITM log-odds itm[1] - itm[0]. With `alpha` the re-ranker's score is fused with the dot score
of the fast stage, alpha · dot + cross (as BLIP does); `choose_alpha` picks alpha on
validation data.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import TYPE_CHECKING, Sequence

import jax
import numpy as np

from ldot_jax.core import parallel
from ldot_jax.core.workdir import DIRECTIONS  # the directions of `retrieval.Reranker`
from ldot_jax.data.batching import bucket_size, collate_regions, collate_text, prefix_mask
from ldot_jax.models.cross_encoder import CrossEncoder
from ldot_jax.models.inputs import check_prefix_mask
from ldot_jax.models.towers import region_fields, text_fields
from ldot_jax.models.vit import patch_boxes

if TYPE_CHECKING:
    from ldot_jax.data.pipeline import TokenizedCaptions

HEADS = ("rank", "itm")
ALPHA_GRID = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0,
              500.0)


def _check_mask(name: str, mask: np.ndarray) -> None:
    """mask: [n, R] of 0/1 with every row 1…1 0…0 (UNITER packs text and regions).

    The prefix check is the model's (`check_prefix_mask`). It reads the mask as booleans, so
    the 0/1 values are checked here first: a 2 would otherwise be stored (or counted in a
    query's length) and reach the jitted scorer, where the model skips its value checks.
    """
    if mask.size and not np.isin(mask, (0, 1)).all():
        bad = np.unique(mask[~np.isin(mask, (0, 1))])[:5].tolist()
        raise ValueError(f"{name}: expected 0/1 values, found {bad}")
    check_prefix_mask(name, mask)


@dataclasses.dataclass(frozen=True)
class ImageStore:
    """The image input of every image of a split, padded to one shape: the cross-encoder's
    region input {"region_feat": f32[N, R, F], "boxes": f32[N, R, 7], "region_mask":
    i32[N, R]} (prefix masks; the model ignores what lies past them, `from_records` puts zeros
    there). Row i is image id i of the split.
    """

    image: dict

    def __post_init__(self):
        feat, boxes, mask = region_fields(self.image)
        feat = np.asarray(feat, np.float32)
        boxes = np.asarray(boxes, np.float32)
        mask = np.asarray(mask, np.int32)
        if feat.ndim != 3:
            raise ValueError(f"ImageStore region_feat: expected f32[N, R, F], got shape "
                             f"{feat.shape}")
        if boxes.ndim != 3 or boxes.shape[:2] != feat.shape[:2]:
            raise ValueError(f"ImageStore boxes has shape {boxes.shape}, expected "
                             f"[{feat.shape[0]}, {feat.shape[1]}, 7] to match region_feat "
                             f"{feat.shape}")
        if mask.shape != feat.shape[:2]:
            raise ValueError(f"ImageStore region_mask has shape {mask.shape}, expected "
                             f"{feat.shape[:2]} to match region_feat {feat.shape}")
        _check_mask("ImageStore region_mask", mask)
        # Frozen, but the field must hold the validated NumPy arrays, not what was passed.
        object.__setattr__(self, "image", {"region_feat": feat, "boxes": boxes,
                                           "region_mask": mask})

    @classmethod
    def from_records(cls, images: Sequence[dict], region_bucket: int | None = None,
                     ) -> "ImageStore":
        """From a split's records (each with "region_feat" [n, F] and "boxes" [n, 7]).

        R is `region_bucket` if given (an image with more regions is an error naming it),
        else the most regions of any image (at least 1).
        """
        if not len(images):
            raise ValueError("ImageStore.from_records: no images")
        records = [images[i] for i in range(len(images))]
        counts = [len(r["region_feat"]) for r in records]
        if region_bucket is not None:
            if int(region_bucket) < 1:
                raise ValueError(f"region_bucket={region_bucket}: expected ≥ 1")
            over = [i for i, n in enumerate(counts) if n > region_bucket]
            if over:
                raise ValueError(f"image {over[0]} has {counts[over[0]]} regions, more "
                                 f"than region_bucket={region_bucket}")
        regions = int(region_bucket) if region_bucket is not None else max(1, max(counts))
        return cls(collate_regions(records, (regions,)))

    def __len__(self) -> int:
        return self.image["region_mask"].shape[0]

    @property
    def num_regions(self) -> int:
        """R, the region count of every pair batch."""
        return self.image["region_mask"].shape[1]

    @property
    def feat_dim(self) -> int:
        return self.image["region_feat"].shape[2]

    @property
    def box_dim(self) -> int:
        return self.image["boxes"].shape[2]

    @property
    def resident_bytes(self) -> int:
        """The bytes the store holds: every image, padded (it grows with the corpus)."""
        return sum(v.nbytes for v in self.image.values())

    def rows(self, index: np.ndarray) -> dict:
        """The image input of images `index` (i64[n]): the store's pytree at those rows."""
        return {k: v[index] for k, v in self.image.items()}


class _OnDemandStore:
    """What the stores that read a split's records on demand share: their size and the
    shape of the region input they give (set by the subclass: _records, _regions, _feat_dim,
    _box_dim)."""

    def __len__(self) -> int:
        return len(self._records)

    @property
    def num_regions(self) -> int:
        return self._regions

    @property
    def feat_dim(self) -> int:
        return self._feat_dim

    @property
    def box_dim(self) -> int:
        return self._box_dim


class RecordImageStore(_OnDemandStore):
    """The image input of a split's images read on demand from its records, for corpora
    whose regions do not fit in memory (COCO's 123k images at 100 regions are ~100 GB as
    padded float32): `records` is any random-access sequence of records (the dataset's
    ArrayRecord source, `dataset.split(name)`), and `rows(index)` reads, checks and pads only
    the images asked for. At most `cache_images` images stay decoded (least recently used
    leave first), so memory is bounded by the cache, not the corpus. The same interface as
    `ImageStore` (len, num_regions, feat_dim, box_dim, rows, resident_bytes); row i is
    record i. Thread-unsafe (one re-ranker per store)."""

    def __init__(self, records: Sequence[dict], region_bucket: int, cache_images: int = 1024):
        if not len(records):
            raise ValueError("RecordImageStore: no images")
        if int(region_bucket) < 1 or int(cache_images) < 1:
            raise ValueError(f"RecordImageStore: region_bucket={region_bucket} and "
                             f"cache_images={cache_images} must be ≥ 1")
        self._records, self._regions = records, int(region_bucket)
        self._capacity = int(cache_images)
        self._cache: collections.OrderedDict[int, tuple[np.ndarray, np.ndarray]] = (
            collections.OrderedDict())
        self._bytes = 0
        feat, boxes = self._image(0)
        self._feat_dim, self._box_dim = feat.shape[1], boxes.shape[1]


    @property
    def resident_bytes(self) -> int:
        """The bytes of the decoded images the cache holds now (≤ cache_images images)."""
        return self._bytes

    def _image(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(region_feat f32[n, F], boxes f32[n, 7]) of image i, checked, from the cache."""
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        if not 0 <= i < len(self._records):
            raise IndexError(f"RecordImageStore: image id {i} is outside [0, "
                             f"{len(self._records)})")
        record = self._records[i]
        count = len(record["region_feat"])
        if count > self._regions:
            raise ValueError(f"RecordImageStore: image {i} has {count} regions, more than "
                             f"region_bucket={self._regions}")
        try:
            padded = collate_regions([record], (self._regions,))
        except ValueError as e:
            raise ValueError(f"RecordImageStore: image {i}: {e}") from e
        entry = (padded["region_feat"][0, :count].copy(), padded["boxes"][0, :count].copy())
        if i and (entry[0].shape[1], entry[1].shape[1]) != (self._feat_dim, self._box_dim):
            raise ValueError(f"RecordImageStore: image {i} has region features of dim "
                             f"{entry[0].shape[1]} and boxes of dim {entry[1].shape[1]}; "
                             f"image 0 has {self._feat_dim} and {self._box_dim}")
        self._cache[i] = entry
        self._bytes += entry[0].nbytes + entry[1].nbytes
        while len(self._cache) > self._capacity:
            _, (feat, boxes) = self._cache.popitem(last=False)
            self._bytes -= feat.nbytes + boxes.nbytes
        return entry

    def rows(self, index: np.ndarray) -> dict:
        """The image input of images `index` (i64[n]), padded to num_regions."""
        index = np.asarray(index, np.int64).reshape(-1)
        out = {"region_feat": np.zeros((len(index), self._regions, self._feat_dim), np.float32),
               "boxes": np.zeros((len(index), self._regions, self._box_dim), np.float32),
               "region_mask": np.zeros((len(index), self._regions), np.int32)}
        for row, i in enumerate(index):
            feat, boxes = self._image(int(i))
            out["region_feat"][row, :len(feat)] = feat
            out["boxes"][row, :len(feat)] = boxes
            out["region_mask"][row, :len(feat)] = 1
        return out


class PatchImageStore(_OnDemandStore):
    """The patch re-ranker's image side: a split's pictures read on demand from its records
    ("image" uint8[S, S, 3]) and turned into the re-ranker's regions, its own ViT's class and
    patch tokens (CrossEncoder.patch_regions: R = 1 + g² regions of dim W, boxes the patch
    cells), in jitted batches of `batch_size` pictures (one compiled program). At most
    `cache_images` images' tokens stay in memory (least recently used leave first), so memory
    is bounded by the cache, not the corpus. The interface of `ImageStore` (len, num_regions,
    feat_dim, box_dim, rows, resident_bytes); row i is record i. Thread-unsafe."""

    def __init__(self, records: Sequence[dict], model: CrossEncoder, params,
                 cache_images: int = 1024, batch_size: int = 32):
        config = model.config
        if config.image_tower != "vit":
            raise ValueError("PatchImageStore needs a patch re-ranker (a CrossEncoder with "
                             "image_tower='vit'); this one reads detector regions")
        if not len(records):
            raise ValueError("PatchImageStore: no images")
        if int(cache_images) < 1 or int(batch_size) < 1:
            raise ValueError(f"PatchImageStore: cache_images={cache_images} and batch_size="
                             f"{batch_size} must be ≥ 1")
        self._records, self._capacity, self._batch = records, int(cache_images), int(batch_size)
        self._side = config.pixels.image_size
        self._regions = config.pixels.grid ** 2 + 1
        self._feat_dim, self._box_dim = config.region.feat_dim, config.region.box_dim
        self._boxes = patch_boxes(config.pixels.grid)  # the same for every picture
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._params = jax.device_put(params)
        self._encode = jax.jit(lambda p, image: model.apply(
            {"params": p}, image, method=CrossEncoder.patch_regions))


    @property
    def resident_bytes(self) -> int:
        """The bytes of the tokens the cache holds now (≤ cache_images images)."""
        return sum(v.nbytes for v in self._cache.values())

    def warmup(self) -> None:
        """Compiles the patch encoder's one program (on black pictures; nothing cached)."""
        black = np.zeros((self._batch, self._side, self._side, 3), np.uint8)
        jax.block_until_ready(self._encode(self._params, {"pixels": black}))

    def _pixels(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self._records):
            raise IndexError(f"PatchImageStore: image id {i} is outside [0, "
                             f"{len(self._records)})")
        record = self._records[i]
        if "image" not in record:
            raise ValueError(f"PatchImageStore: record {i} has no picture ('image'); prepare "
                             f"the dataset with image_size={self._side}")
        pixels = np.asarray(record["image"])
        if pixels.shape != (self._side, self._side, 3) or pixels.dtype != np.uint8:
            raise ValueError(f"PatchImageStore: image {i} has pixels {pixels.dtype}"
                             f"{list(pixels.shape)}, the re-ranker reads uint8"
                             f"[{self._side}, {self._side}, 3]")
        return pixels

    def _fill(self, missing: list[int]) -> None:
        """Encodes the pictures of `missing` (batches of batch_size, the last padded)."""
        for start in range(0, len(missing), self._batch):
            chunk = missing[start:start + self._batch]
            pixels = np.zeros((self._batch, self._side, self._side, 3), np.uint8)
            pixels[:len(chunk)] = [self._pixels(i) for i in chunk]
            out = jax.device_get(self._encode(self._params, {"pixels": pixels}))
            for row, i in enumerate(chunk):
                self._cache[i] = np.asarray(out["region_feat"][row], np.float32)
            while len(self._cache) > self._capacity:
                self._cache.popitem(last=False)

    def rows(self, index: np.ndarray) -> dict:
        """The region input of images `index` (i64[n]): {"region_feat": f32[n, R, W],
        "boxes": f32[n, R, 7], "region_mask": i32[n, R] all ones}."""
        index = [int(i) for i in np.asarray(index, np.int64).reshape(-1)]
        missing = list(dict.fromkeys(i for i in index if i not in self._cache))
        self._fill(missing)
        feats = []
        for i in index:
            if i not in self._cache:  # evicted by this very call (n > cache_images)
                self._fill([i])
            self._cache.move_to_end(i)
            feats.append(self._cache[i])
        feat = np.stack(feats) if feats else np.zeros((0, self._regions, self._feat_dim),
                                                      np.float32)
        boxes = np.broadcast_to(self._boxes, (len(index),) + self._boxes.shape).copy()
        return {"region_feat": feat, "boxes": boxes,
                "region_mask": np.ones((len(index), self._regions), np.int32)}


@dataclasses.dataclass(frozen=True)
class CaptionStore:
    """The token ids of every caption of a split.

    input_ids i32[T, Lmax] ([CLS] … [SEP], zero-padded), lengths i32[T] (≥ 1), image i32[T]
    (the caption's own image: the ground truth of image → text). Row t is caption id t.
    """

    input_ids: np.ndarray
    lengths: np.ndarray
    image: np.ndarray

    def __post_init__(self):
        ids = np.asarray(self.input_ids)
        lengths = np.asarray(self.lengths)
        image = np.asarray(self.image)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"CaptionStore.input_ids: expected i32[T, Lmax], got shape "
                             f"{ids.shape} dtype {ids.dtype}")
        for name, x in (("lengths", lengths), ("image", image)):
            if x.shape != ids.shape[:1] or not np.issubdtype(x.dtype, np.integer):
                raise ValueError(f"CaptionStore.{name}: expected i32[{ids.shape[0]}] (one per "
                                 f"caption of input_ids {ids.shape}), got shape {x.shape} "
                                 f"dtype {x.dtype}")
        bad = np.nonzero((lengths < 1) | (lengths > ids.shape[1]))[0]
        if bad.size:
            raise ValueError(f"CaptionStore: caption {bad[0]} has length {lengths[bad[0]]}, "
                             f"expected 1 … {ids.shape[1]} (input_ids {ids.shape})")
        object.__setattr__(self, "input_ids", ids.astype(np.int32))
        object.__setattr__(self, "lengths", lengths.astype(np.int32))
        object.__setattr__(self, "image", image.astype(np.int32))

    @classmethod
    def from_captions(cls, captions: "TokenizedCaptions") -> "CaptionStore":
        """From a split's `pipeline.TokenizedCaptions` (caption t = captions.token_ids[t])."""
        if not len(captions):
            raise ValueError("CaptionStore.from_captions: no captions")
        lengths = np.asarray([len(t) for t in captions.token_ids], np.int32)
        ids = np.zeros((len(lengths), max(1, int(lengths.max()))), np.int32)
        for t, tokens in enumerate(captions.token_ids):
            ids[t, :len(tokens)] = tokens
        return cls(ids, lengths, np.asarray(captions.image, np.int32))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


# ---------------------------------------------------------------------------------------------
# Score fusion


def fuse(dot: np.ndarray, cross: np.ndarray, alpha: float | None) -> np.ndarray:
    """f32[Q, M]: alpha · dot + cross, or cross alone when alpha is None or 0 (LightningDOT
    re-ranks by the cross-encoder alone; 0 · (-inf) of a missing dot score must not give NaN).
    """
    cross = np.asarray(cross, np.float32)
    if alpha is None or alpha == 0:
        return cross
    dot = np.asarray(dot, np.float32)
    if dot.shape != cross.shape:
        raise ValueError(f"fuse: dot scores {dot.shape} and cross scores {cross.shape} differ")
    return (np.float32(alpha) * dot + cross).astype(np.float32)


def _recall_at_1(scores: np.ndarray, positive: np.ndarray) -> float:
    """Percent of queries whose top candidate (the first of equal scores) is a positive.

    scores f32[Q, M] (-inf: no candidate, never a hit); positive bool[Q, M]. A query with no
    positive among its candidates counts as a miss (recall over all queries).
    """
    scores = np.where(np.isnan(scores), -np.inf, scores)
    top = np.argmax(scores, axis=1)  # the first maximum: ties go to the smaller position
    rows = np.arange(len(scores))
    hits = positive[rows, top] & (scores[rows, top] > -np.inf)
    return 100.0 * float(hits.mean())


def choose_alpha(dot: np.ndarray, cross: np.ndarray, positive: np.ndarray,
                 grid: Sequence[float] = ALPHA_GRID, candidates: np.ndarray | None = None,
                 ) -> tuple[float, dict[float, float]]:
    """The fusion weight maximizing R@1 on validation data.

    dot f32[Q, M]: the fast stage's scores; cross f32[Q, M]: the re-ranker's (alpha=None);
    positive bool[Q, M]: candidate j of query q is a match; candidates i64[Q, M] (optional):
    ids, -1 where there is no candidate (scored -inf, never ranked first; -inf cross scores
    count the same). grid: alphas ≥ 0 to try; alpha = 0 is the re-ranker alone (the same as
    alpha=None in `fuse` and `CrossEncoderReranker`).

    Returns (alpha, {alpha: R@1 in percent}); of equally good alphas the smallest wins, so
    the re-ranker alone is kept unless fusion helps.
    """
    dot, cross = np.asarray(dot, np.float32), np.asarray(cross, np.float32)
    positive = np.asarray(positive, bool)
    if cross.ndim != 2 or not cross.size:
        raise ValueError(f"choose_alpha: cross scores must be f32[Q, M] with Q, M ≥ 1, got "
                         f"shape {cross.shape}")
    for name, x in (("dot", dot), ("positive", positive)):
        if x.shape != cross.shape:
            raise ValueError(f"choose_alpha: {name} has shape {x.shape}, cross {cross.shape}")
    valid = np.ones(cross.shape, bool)
    if candidates is not None:
        candidates = np.asarray(candidates)
        if candidates.shape != cross.shape:
            raise ValueError(f"choose_alpha: candidates has shape {candidates.shape}, cross "
                             f"{cross.shape}")
        valid = candidates >= 0
    grid = sorted(float(a) for a in grid)
    if not grid or not all(np.isfinite(a) and a >= 0 for a in grid):
        raise ValueError(f"choose_alpha: grid={grid}: expected finite alphas ≥ 0")
    table = {a: _recall_at_1(np.where(valid, fuse(dot, cross, a), -np.inf), positive)
             for a in grid}
    best = grid[0]
    for a in grid[1:]:
        if table[a] > table[best]:  # strictly better: ties keep the smaller alpha
            best = a
    return best, table


# ---------------------------------------------------------------------------------------------
# The re-ranker


class CrossEncoderReranker:
    """Re-scores (text, image) pairs with a CrossEncoder (see the module docstring).

    model / params: a `CrossEncoder` and its params. images: the candidate images of
    text → image (and the region count R); captions: the candidate captions of image → text.
    mesh: a `parallel.make_mesh` mesh (params replicated, pairs split over `data`) or None
    (plain jit on the default device). num_regions: R when there is no image store (image →
    text alone). pairs_per_batch: pairs per jitted call (a multiple of the data axis size).
    text_buckets: padded caption lengths, with [CLS] / [SEP]. head: "rank" or "itm".
    alpha: None (re-ranker score alone) or the weight of the dot score in the fused score.
    """

    def __init__(self, model: CrossEncoder, params,
                 images: ImageStore | RecordImageStore | None = None,
                 captions: CaptionStore | None = None, mesh=None, pairs_per_batch: int = 256,
                 text_buckets: Sequence[int] = (16, 24, 32, 48, 64), head: str = "rank",
                 alpha: float | None = None, num_regions: int | None = None):
        if not isinstance(model, CrossEncoder):
            raise ValueError(f"model: expected a CrossEncoder, got {type(model).__name__}")
        if head not in HEADS:
            raise ValueError(f"head={head!r}: expected one of {HEADS}")
        if alpha is not None and not np.isfinite(alpha):
            raise ValueError(f"alpha={alpha}: expected None or a finite float")
        if not isinstance(pairs_per_batch, int) or pairs_per_batch < 1:
            raise ValueError(f"pairs_per_batch={pairs_per_batch!r}: expected a positive int")
        if mesh is not None and pairs_per_batch % parallel.data_size(mesh):
            raise ValueError(f"pairs_per_batch={pairs_per_batch} is not divisible by the "
                             f"{parallel.data_size(mesh)} devices of the mesh's data axis")
        buckets = tuple(sorted({int(b) for b in text_buckets}))
        max_positions = model.config.transformer.max_position_embeddings
        if not buckets or buckets[0] < 1 or buckets[-1] > max_positions:
            raise ValueError(f"text_buckets={tuple(text_buckets)}: expected lengths in 1 … "
                             f"max_position_embeddings={max_positions}")
        region = model.config.region
        if images is not None:
            if images.feat_dim != region.feat_dim or images.box_dim != region.box_dim:
                raise ValueError(f"images: feat_dim {images.feat_dim} / box_dim "
                                 f"{images.box_dim}, the model expects feat_dim="
                                 f"{region.feat_dim} and box_dim={region.box_dim}")
            if num_regions is not None and num_regions != images.num_regions:
                raise ValueError(f"num_regions={num_regions} but the image store has "
                                 f"R={images.num_regions}")
            num_regions = images.num_regions
        if num_regions is not None and num_regions < 1:
            raise ValueError(f"num_regions={num_regions}: expected ≥ 1")
        if captions is not None and captions.lengths.max() > buckets[-1]:
            t = int(np.argmax(captions.lengths))
            raise ValueError(f"captions: caption {t} has {captions.lengths[t]} tokens, more "
                             f"than the largest text bucket {buckets[-1]}")
        self.model, self.images, self.captions, self.mesh = model, images, captions, mesh
        self.pairs_per_batch, self.text_buckets = pairs_per_batch, buckets
        self.head, self.alpha, self.num_regions = head, alpha, num_regions
        if mesh is None:
            self.params = jax.device_put(params)
        else:
            self.params = parallel.replicate(params, mesh)
        if captions is not None:
            self._caption_text = self._text_table(captions.input_ids, captions.lengths,
                                                  "captions")
        self._compiles = 0
        self._scorer = jax.jit(self._make_scorer())

    def _make_scorer(self):
        model, head = self.model, self.head

        def score(params, text, image):
            """f32[P]: one fixed-shape batch of P pairs, text / image input pytrees
            (P@data with a mesh)."""
            self._compiles += 1  # runs once per trace, i.e. once per compiled program
            if head == "rank":
                return model.apply({"params": params}, text, image, method=model.score)
            itm = model.apply({"params": params}, text, image).itm_logits
            return itm[:, 1] - itm[:, 0]
        return score

    @property
    def compiles(self) -> int:
        """How many programs the scorer has compiled (at most len(text_buckets))."""
        return self._compiles

    # -- inputs -------------------------------------------------------------------------------

    def _text_table(self, input_ids, lengths, what: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids i32[n, Lb], lengths i32[n]), Lb the largest bucket, zeros past each length."""
        ids, lengths = np.asarray(input_ids), np.asarray(lengths)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{what}: input_ids must be i32[n, L], got shape {ids.shape} "
                             f"dtype {ids.dtype}")
        if lengths.shape != ids.shape[:1]:
            raise ValueError(f"{what}: lengths has shape {lengths.shape}, expected "
                             f"{ids.shape[:1]} for input_ids {ids.shape}")
        bad = np.nonzero((lengths < 1) | (lengths > ids.shape[1]))[0]
        if bad.size:
            raise ValueError(f"{what}: text {bad[0]} has length {lengths[bad[0]]}, expected "
                             f"1 … {ids.shape[1]} (input_ids {ids.shape})")
        longest = int(lengths.max()) if lengths.size else 0
        if longest > self.text_buckets[-1]:
            t = int(np.argmax(lengths))
            raise ValueError(f"{what}: text {t} has {longest} tokens, more than the largest "
                             f"text bucket {self.text_buckets[-1]} (text is never truncated)")
        width = self.text_buckets[-1]
        keep = prefix_mask(lengths, ids.shape[1]).astype(bool)
        vocab = self.model.config.transformer.vocab_size
        outside = keep & ((ids < 0) | (ids >= vocab))
        if outside.any():
            raise ValueError(f"{what}: token ids {np.unique(ids[outside])[:5].tolist()} are "
                             f"outside the vocabulary [0, {vocab})")
        table = np.zeros((len(ids), width), np.int32)
        cols = min(width, ids.shape[1])
        table[:, :cols] = np.where(keep, ids, 0)[:, :cols]
        return table, lengths.astype(np.int32)

    def _region_count(self, what: str) -> int:
        if self.num_regions is None:
            raise ValueError(f"{what} needs a fixed region count: pass images= or "
                             f"num_regions= to CrossEncoderReranker")
        return self.num_regions

    def _conform_regions(self, image, what: str) -> ImageStore:
        """A region input (region_feat f32[n, R', F], boxes [n, R', 7], region_mask
        i32[n, R']) padded or cropped to the store's R (the crop only drops padding: more than
        R real regions is an error)."""
        regions = self._region_count(what)
        feat, boxes, mask = (np.asarray(x, t) for x, t in zip(
            region_fields(image), (np.float32, np.float32, np.int32)))
        region = self.model.config.region
        if feat.ndim != 3 or feat.shape[2] != region.feat_dim:
            raise ValueError(f"{what}: region_feat has shape {feat.shape}, expected "
                             f"f32[n, R, {region.feat_dim}]")
        if boxes.shape != feat.shape[:2] + (region.box_dim,):
            raise ValueError(f"{what}: boxes has shape {boxes.shape}, expected "
                             f"{feat.shape[:2] + (region.box_dim,)}")
        if mask.shape != feat.shape[:2]:
            raise ValueError(f"{what}: region_mask has shape {mask.shape}, expected "
                             f"{feat.shape[:2]}")
        _check_mask(f"{what}: region_mask", mask)
        counts = mask.sum(axis=1)
        if counts.size and counts.max() > regions:
            q = int(np.argmax(counts))
            raise ValueError(f"{what}: image {q} has {counts[q]} regions, more than the "
                             f"re-ranker's R={regions}")
        cols = min(regions, feat.shape[1])
        keep = mask[:, :cols, None].astype(np.float32)  # padding regions become zeros
        out_feat = np.zeros((len(feat), regions, feat.shape[2]), np.float32)
        out_boxes = np.zeros((len(feat), regions, boxes.shape[2]), np.float32)
        out_mask = np.zeros((len(feat), regions), np.int32)
        out_feat[:, :cols] = feat[:, :cols] * keep
        out_boxes[:, :cols] = boxes[:, :cols] * keep
        out_mask[:, :cols] = mask[:, :cols]
        return ImageStore({"region_feat": out_feat, "boxes": out_boxes, "region_mask": out_mask})

    # -- scoring ------------------------------------------------------------------------------

    def _put(self, x: np.ndarray):
        """A host batch [P, ...] → P@data over the mesh (each process holds all of it)."""
        sharding = parallel.batch_sharding(self.mesh)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    def _run(self, text: dict, image: dict):
        """One jitted call on a full batch (text / image input pytrees [P, ...]); returns the
        (not yet fetched) f32[P]."""
        if self.mesh is None:
            return self._scorer(self.params, text, image)
        with jax.set_mesh(self.mesh):
            return self._scorer(self.params, jax.tree.map(self._put, text),
                                jax.tree.map(self._put, image))

    def _fetch(self, y) -> np.ndarray:
        return np.asarray(parallel.gather_rows(y) if self.mesh is not None
                          else jax.device_get(y), np.float32)

    def _score_rows(self, text: tuple[np.ndarray, np.ndarray], text_rows: np.ndarray,
                    regions: ImageStore, region_rows: np.ndarray) -> np.ndarray:
        """f32[n]: pair i = (text row text_rows[i], region row region_rows[i]).

        Rows are gathered batch by batch (never Q × M copies of the regions); pairs are
        sorted by text length so each batch pads to the smallest bucket its texts allow.
        """
        table, lengths = text
        n = len(text_rows)
        out = np.empty(n, np.float32)
        if not n:
            return out
        size = self.pairs_per_batch
        order = np.argsort(lengths[text_rows], kind="stable")
        pending = []
        for start in range(0, n, size):
            chosen = order[start:start + size]
            # The last batch is filled with copies of its first pair; their scores are dropped.
            take = np.concatenate([chosen, np.full(size - len(chosen), chosen[0])])
            t, r = text_rows[take], region_rows[take]
            width = bucket_size(int(lengths[t].max()), self.text_buckets,
                                "caption length (tokens with [CLS]/[SEP])")
            text_batch = {"input_ids": table[t, :width],
                          "attention_mask": prefix_mask(lengths[t], width)}
            pending.append((chosen, self._run(text_batch, regions.rows(r))))
        for chosen, y in pending:  # fetched at the end: dispatch runs ahead of the device
            out[chosen] = self._fetch(y)[:len(chosen)]
        return out

    def score_pairs(self, input_ids: np.ndarray, lengths: np.ndarray,
                    image_ids: np.ndarray) -> np.ndarray:
        """f32[n]: text i (input_ids i32[n, L] with lengths i32[n]) against stored image
        image_ids[i] (i64[n], ids into `images`)."""
        store = self._image_store("score_pairs")
        text = self._text_table(input_ids, lengths, "score_pairs")
        image_ids = np.asarray(image_ids)
        if image_ids.shape != text[1].shape:
            raise ValueError(f"score_pairs: image_ids has shape {image_ids.shape}, expected "
                             f"{text[1].shape} (one per text)")
        self._check_ids(image_ids, len(store), "score_pairs: image_ids", allow_missing=False)
        rows = np.arange(len(image_ids))
        return self._score_rows(text, rows, store, image_ids.astype(np.int64))

    def score_text_image(self, input_ids: np.ndarray, lengths: np.ndarray,
                         image: dict) -> np.ndarray:
        """f32[n]: text i (input_ids i32[n, L], lengths i32[n]) against image i (the region
        input [n, R', ...] with prefix masks, padded or cropped to the re-ranker's R)."""
        text = self._text_table(input_ids, lengths, "score_text_image")
        regions = self._conform_regions(image, "score_text_image")
        if len(regions) != len(text[1]):
            raise ValueError(f"score_text_image: {len(text[1])} texts and {len(regions)} "
                             f"images; expected one image per text")
        rows = np.arange(len(regions))
        return self._score_rows(text, rows, regions, rows)

    def _image_store(self, what: str) -> ImageStore:
        if self.images is None:
            raise ValueError(f"{what} scores against stored images: pass images=ImageStore")
        return self.images

    @staticmethod
    def _check_ids(ids: np.ndarray, count: int, what: str, allow_missing: bool) -> None:
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{what}: expected integer ids, got dtype {ids.dtype}")
        low = -1 if allow_missing else 0
        bad = (ids < low) | (ids >= count)
        if bad.any():
            raise ValueError(f"{what}: ids {np.unique(ids[bad])[:5].tolist()} are outside "
                             f"[{low}, {count})")

    def __call__(self, direction: str, queries: dict[str, np.ndarray], candidates: np.ndarray,
                 scores: np.ndarray) -> np.ndarray:
        """The `retrieval.Reranker` protocol: f32[Q, M] new scores (-inf where candidates is
        -1; fused with `scores` when alpha is set).

        text_to_image: queries = the text input (input_ids / attention_mask i32[Q, L], prefix
        masks), candidates i64[Q, M] image ids. image_to_text: queries = the image input
        [Q, R', ...], candidates i64[Q, M] caption ids.
        """
        if direction not in DIRECTIONS:
            raise ValueError(f"direction={direction!r}: expected one of {DIRECTIONS}")
        candidates = np.asarray(candidates)
        scores = np.asarray(scores, np.float32)
        if candidates.ndim != 2:
            raise ValueError(f"candidates: expected i64[Q, M], got shape {candidates.shape}")
        if scores.shape != candidates.shape:
            raise ValueError(f"scores has shape {scores.shape}, candidates {candidates.shape}")
        q, m = candidates.shape
        valid = candidates >= 0
        # Missing candidates are never scored: only the valid (query, candidate) pairs go out.
        query_rows = np.repeat(np.arange(q), m).reshape(q, m)[valid]
        if direction == "text_to_image":
            store = self._image_store("text_to_image re-ranking")
            self._check_ids(candidates, len(store), "candidates (image ids)", True)
            input_ids, mask = text_fields(queries)
            mask = np.asarray(mask)
            if mask.ndim != 2:
                raise ValueError(f"queries attention_mask: expected i32[Q, L], got shape "
                                 f"{mask.shape}")
            _check_mask("queries attention_mask", mask)
            text = self._text_table(input_ids, mask.sum(axis=1), "queries")
            if len(text[1]) != q:
                raise ValueError(f"{len(text[1])} text queries but candidates has {q} rows")
            flat = self._score_rows(text, query_rows, store, candidates[valid].astype(np.int64))
        else:
            if self.captions is None:
                raise ValueError("image_to_text re-ranking scores against stored captions: "
                                 "pass captions=CaptionStore")
            self._check_ids(candidates, len(self.captions), "candidates (caption ids)", True)
            regions = self._conform_regions(queries, "queries")
            if len(regions) != q:
                raise ValueError(f"{len(regions)} image queries but candidates has {q} rows")
            flat = self._score_rows(self._caption_text, candidates[valid].astype(np.int64),
                                    regions, query_rows)
        cross = np.full((q, m), -np.inf, np.float32)
        cross[valid] = flat
        return np.where(valid, fuse(scores, cross, self.alpha), -np.inf).astype(np.float32)

    def warmup(self) -> None:
        """Compiles the scorer for every text bucket, so no later call compiles."""
        regions = self._region_count("warmup")
        size = self.pairs_per_batch
        region = self.model.config.region
        stub = {"region_feat": np.zeros((regions, region.feat_dim)),
                "boxes": np.zeros((regions, region.box_dim))}
        image = collate_regions([stub] * size, (regions,))
        for width in self.text_buckets:
            self._fetch(self._run(collate_text([[0] * width] * size, (width,)), image))
        if hasattr(self.images, "warmup"):  # a patch store's ViT program too
            self.images.warmup()
