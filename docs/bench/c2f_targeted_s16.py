import sys, time, json, gc
import numpy as np
from ldot_jax.bench import search as bs
from ldot_jax.index import ExactIndex, HierarchicalIndex, ScannIndex, tuning
database, queries, tuning_q, source = bs._corpus("matryoshka", 1_000_000, 768, 1000, None)
k = 100
rows, truth = bs._bench_exact(database, queries, k, 100)
n, dim = database.shape
ids = np.arange(n)
exact = ExactIndex(dim).add(database, ids)
out = []
plans = [("scann", lambda o: ScannIndex(dim, **o))] + [
    (f"c2f d_low={d}", (lambda d: lambda o: HierarchicalIndex(dim, d, **o))(d)) for d in (64, 128)]
for name, make in plans:
    t = time.perf_counter()
    index, report = tuning.tune(make, database, ids, tuning_q, 0.95, 10,
                                tuning.build_ladder(n, {}), exact=exact, built={})
    spent = time.perf_counter() - t
    print(f"tuned {name}: {report.summary()} ({spent:.0f} s)", flush=True)
    timing = bs._timed_search(bs._index_search(index), queries, k, 100)
    row = bs._row(f"{name} target=0.95", spent, 0, timing, truth)
    out.append(row)
    del index
    gc.collect()
json.dump(out, open("/tmp/c2f.json", "w"), indent=1)
