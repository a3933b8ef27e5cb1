"""ldot_jax: LightningDOT-style real-time image–text retrieval in JAX/Flax.

The public API:
  convert_checkpoint(kind, input, output)   PyTorch LightningDOT / UNITER / BERT → model dir
  load_dual_encoder(dir) → (DualEncoder, params)
  load_cross_encoder(dir) → (CrossEncoder, params)
  load_pretraining_model(dir) → (DualEncoderForPretraining, params)
  load_pretrained(dir) → Pretrained(kind, config, params, metadata)
  save_pretrained(dir, kind, config, params)
  Retriever.load(workdir).search_text(captions, k)       the fast stage (ldot_jax/retrieval/)
  ExactIndex / ScannIndex / HierarchicalIndex, load_index  the indexes (ldot_jax/index/)

The layers, lowest first (each imports only from its own layer or below; tests/test_layers.py):
  core → data → models → checkpoints → index → retrieval → evaluation → training → tools
"""

import importlib

# Exports are imported on first use, so that light submodules (the data generators that worker
# processes run) do not pay for importing JAX and Flax.
_EXPORTS = {
    "convert_checkpoint": "ldot_jax.checkpoints.convert",
    "CrossEncoder": "ldot_jax.models", "CrossEncoderConfig": "ldot_jax.models",
    "DualEncoder": "ldot_jax.models", "DualEncoderConfig": "ldot_jax.models",
    "DualEncoderForPretraining": "ldot_jax.models", "RegionConfig": "ldot_jax.models",
    "TransformerConfig": "ldot_jax.models", "dot_scores": "ldot_jax.models",
    "load_cross_encoder": "ldot_jax.checkpoints.pretrained", "load_dual_encoder": "ldot_jax.checkpoints.pretrained",
    "load_pretrained": "ldot_jax.checkpoints.pretrained", "load_pretraining_model": "ldot_jax.checkpoints.pretrained",
    "save_pretrained": "ldot_jax.checkpoints.pretrained",
    "Retriever": "ldot_jax.retrieval", "ExactIndex": "ldot_jax.index",
    "ScannIndex": "ldot_jax.index", "HierarchicalIndex": "ldot_jax.index",
    "load_index": "ldot_jax.index",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ldot_jax' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])


__version__ = "0.2.0"

__all__ = sorted(_EXPORTS)
