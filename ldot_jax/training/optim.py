"""Optimizers: the LightningDOT recipes as optax chains.

    tx, schedule = make_optimizer(config.optimizer, total_steps, params)

`config.optimizer` (ml_collections or any mapping / attribute object) holds:
  learning_rate      peak rate
  warmup_steps       linear warm-up from 0 (an int), or
  warmup_fraction    … as a fraction of the updates (fine-tuning: 0.1); then linear decay to 0
  b1, b2, eps        AdamW moments
  weight_decay       decoupled, never on biases, LayerNorm scales or loss parameters
  clip_norm          global-norm clipping of the trainable gradients (None: off)
  accumulation_steps gradients of this many micro-steps are averaged into one update
                     (optax.MultiSteps); the schedule counts updates, not micro-steps
  frozen             param path prefixes that never change, e.g. ("dual_encoder/text_tower",)

Recipes of the original: pre-training lr 5e-5, 10k warm-up, β = (0.9, 0.98), eps 1e-6,
wd 0.01, clip 5.0; fine-tuning lr 2e-5, 10% warm-up, β = (0.9, 0.999), eps 1e-8, wd 0,
clip 2.0 (ldot_jax/configs/pretrain.py and configs/finetune_*.py).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import optax


NO_DECAY_LEAVES = ("bias", "scale")  # biases and LayerNorm scales (HF's no_decay)
LOSS_PARAMS = "contrastive"  # top-level params of the loss (temperature, bias): no decay


def _get(config, key, default=None):
    """config[key] for mappings and ConfigDicts, else the attribute; `default` if absent."""
    if hasattr(config, "get"):
        return config.get(key, default)
    return getattr(config, key, default)


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def path_string(path) -> str:
    return "/".join(_path_names(path))


def warmup_linear_decay(peak: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """0 → peak linearly over `warmup_steps`, then peak → 0 linearly at `total_steps`."""
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps}: expected ≥ 1")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} outside [0, total_steps={total_steps}]")
    decay = optax.linear_schedule(peak, 0.0, max(total_steps - warmup_steps, 1))
    if warmup_steps == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), decay],
                                [warmup_steps])


def decay_mask(params) -> Any:
    """True for leaves that take weight decay (kernels and embeddings)."""
    def decays(path, _):
        names = _path_names(path)
        return names[0] != LOSS_PARAMS and names[-1] not in NO_DECAY_LEAVES
    return jax.tree.map_with_path(decays, params)


def frozen_labels(params, frozen: Sequence[str]) -> Any:
    """"frozen" / "trained" per leaf; an error names a prefix that matches nothing."""
    frozen = [p.strip("/") for p in frozen]
    used = set()

    def label(path, _):
        name = path_string(path)
        for prefix in frozen:
            if name == prefix or name.startswith(prefix + "/"):
                used.add(prefix)
                return "frozen"
        return "trained"
    labels = jax.tree.map_with_path(label, params)
    unused = [p for p in frozen if p not in used]
    if unused:
        tops = sorted({path_string(p[:2]) for p, _ in jax.tree.flatten_with_path(params)[0]})
        raise ValueError(f"optimizer.frozen: {unused} match no parameter (paths start with "
                         f"{tops})")
    return labels


def make_optimizer(config, total_steps: int, params) -> tuple[optax.GradientTransformation,
                                                               Callable[[int], float]]:
    """(optax transformation, learning-rate schedule over update steps)."""
    warmup = _get(config, "warmup_steps")
    fraction = _get(config, "warmup_fraction")
    if warmup is None and fraction is None:
        raise ValueError("optimizer: set warmup_steps or warmup_fraction")
    if warmup is None:
        if not 0 <= fraction <= 1:
            raise ValueError(f"optimizer.warmup_fraction={fraction}: expected in [0, 1]")
        warmup = int(round(fraction * total_steps))
    schedule = warmup_linear_decay(float(_get(config, "learning_rate")), int(warmup), total_steps)
    chain = []
    clip = _get(config, "clip_norm")
    if clip:
        chain.append(optax.clip_by_global_norm(float(clip)))
    chain.append(optax.adamw(schedule, b1=float(_get(config, "b1", 0.9)),
                             b2=float(_get(config, "b2", 0.999)),
                             eps=float(_get(config, "eps", 1e-8)),
                             weight_decay=float(_get(config, "weight_decay", 0.0)),
                             mask=decay_mask))
    tx = optax.chain(*chain)
    frozen = tuple(_get(config, "frozen", ()) or ())
    if frozen:
        tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()},
                                   frozen_labels(params, frozen))
    steps = int(_get(config, "accumulation_steps", 1) or 1)
    if steps < 1:
        raise ValueError(f"optimizer.accumulation_steps={steps}: expected ≥ 1")
    if steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=steps)
    return tx, schedule
