"""Layer 6, retrieval (the serving path): tower encoding (encode), corpus extraction
(extract), the Retriever (retriever), the cross-encoder re-ranker (rerank) and building a
run's indexes (index_build).

    from ldot_jax.retrieval import Retriever
"""

from ldot_jax.retrieval.retriever import Catalog, Results, Retriever

__all__ = ["Catalog", "Results", "Retriever"]
