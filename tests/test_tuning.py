"""Recall-targeted index settings (index/tuning.py) on small corpora of two generators: the
target is met on the tuning queries and, within sampling error, on other held-out queries;
an unreachable target is reported with the best point; saved settings reproduce the recall."""

import logging

import numpy as np
import pytest

from ldot_jax.bench import vectors
from ldot_jax.index import ExactIndex, HierarchicalIndex, ScannIndex, load_index, tuning
from ldot_jax.index.health import overlap_recall

N, DIM, Q, K = 20_000, 32, 300, 10
# A tree on a corpus this small (the size rule builds one from 100k vectors on): 200 leaves,
# searching 1, so that these settings miss a 0.95 target (0.84 / 0.23 recall@10).
SMALL_TREE = {"num_leaves": 200, "leaves_to_search": 1, "training_sample_size": N}


def corpus(name):
    database, queries = vectors.GENERATORS[name](N, DIM, num_queries=2 * Q, seed=3)
    return database, queries[:Q], queries[Q:]  # tuning queries, other held-out queries


def recall_of(index, exact, queries, **options):
    return overlap_recall(index.search(queries, K, **options).ids,
                          exact.search(queries, K).ids, K)


@pytest.mark.parametrize("name", ["matryoshka", "isotropic"])
def test_the_targeted_build_meets_its_target_on_held_out_queries(name):
    database, tune_q, check_q = corpus(name)
    ids = np.arange(N)
    exact = ExactIndex(DIM).add(database, ids)
    untuned = ScannIndex(DIM, **SMALL_TREE).add(database, ids)
    assert recall_of(untuned, exact, tune_q) < 0.95  # the target needs tuning here
    index, report = tuning.tune(lambda o: ScannIndex(DIM, **{**SMALL_TREE, **o}), database,
                                ids, tune_q, 0.95, K, exact=exact)
    assert report.met and report.chosen.recall >= 0.95
    # The index searches with the chosen settings by default, and they hold on other queries.
    assert recall_of(index, exact, tune_q) == pytest.approx(report.chosen.recall, abs=1e-9)
    assert recall_of(index, exact, check_q) >= 0.93
    # The cheapest point: every probe that met the target was no faster than the chosen one.
    assert report.chosen.qps == max(p.qps for p in report.probes if p.recall >= 0.95)
    assert index.scann_params.leaves_to_search == report.chosen.leaves_to_search
    assert index.scann_params.reorder == report.chosen.depth


def test_an_unreachable_target_is_reported_with_the_best_point(caplog):
    database, tune_q, _ = corpus("isotropic")
    ids = np.arange(N)
    with caplog.at_level(logging.WARNING, logger="ldot_jax.index.tuning"):
        index, report = tuning.tune(lambda o: ScannIndex(DIM, **{**SMALL_TREE, **o}),
                                    database, ids, tune_q, 1.0, K, max_probes=3)
    assert not report.met and len(report.probes) == 3
    assert report.chosen.recall == max(p.recall for p in report.probes) < 1.0
    assert "not met" in caplog.text and "does NOT meet the target 1.0" in report.summary()
    assert report.to_json()["met"] is False
    with pytest.raises(ValueError, match="target recall 1.5"):
        tuning.tune(lambda o: ScannIndex(DIM), database, ids, tune_q, 1.5)
    with pytest.raises(ValueError, match="held-out queries"):
        tuning.tune(lambda o: ScannIndex(DIM), database, ids, tune_q[:0], 0.9)


def test_saved_settings_reproduce_the_recall_on_reload(tmp_path):
    database, tune_q, check_q = corpus("matryoshka")
    ids = np.arange(N)
    exact = ExactIndex(DIM).add(database, ids)
    index, report = tuning.tune(lambda o: ScannIndex(DIM, **{**SMALL_TREE, **o}), database,
                                ids, tune_q, 0.97, K, exact=exact)
    index.info["tuning"] = report.to_json()
    loaded = load_index(index.save(tmp_path / "index"))
    assert loaded.info["tuning"]["chosen"]["recall"] == round(report.chosen.recall, 4)
    for queries in (tune_q, check_q):
        np.testing.assert_array_equal(loaded.search(queries, K).ids,
                                      index.search(queries, K).ids)
    assert recall_of(loaded, exact, tune_q) == pytest.approx(report.chosen.recall, abs=1e-9)


def test_coarse_to_fine_takes_the_target_through_its_candidates(tmp_path):
    database, tune_q, _ = corpus("matryoshka")
    ids = np.arange(N)
    exact = ExactIndex(DIM).add(database, ids)
    make = lambda o: HierarchicalIndex(DIM, 8, candidates=20, **{**SMALL_TREE, **o})  # noqa
    assert recall_of(make({}).add(database, ids), exact, tune_q) < 0.95
    index, report = tuning.tune(make, database, ids, tune_q, 0.95, K, exact=exact)
    assert report.met and report.depth_name == "candidates"
    assert index.candidates == report.chosen.depth
    loaded = load_index(index.save(tmp_path / "hier"))
    assert loaded.candidates == report.chosen.depth
    assert recall_of(loaded, exact, tune_q) == pytest.approx(report.chosen.recall, abs=1e-9)


def test_the_build_ladder_trains_on_more_vectors_only_when_the_rule_sampled():
    assert tuning.build_ladder(50_000, {}) == [{}]  # no tree below 100k
    assert tuning.build_ladder(1_000_000, {}) == [{}, {"training_sample_size": 500_000}]
    assert tuning.build_ladder(1_000_000, {"training_sample_size": 10}) == [{}]


def test_bench_search_covers_every_corpus_with_targeted_rows(tmp_path):
    """`ldot bench search` on tiny sizes: a run per generator, each with the recall-targeted
    rows (tuned on other queries than the measured ones), the JSON, Markdown and plot."""
    import json

    from ldot_jax.bench import search
    out = tmp_path / "bench"
    assert search.main(["--sizes", "3000", "--dim", "16", "--d_low", "4", "--queries", "40",
                        "--single", "2", "--no_sweeps", "--out", str(out)]) == 0
    results = json.loads((out / "search.json").read_text())
    assert sorted(e["corpus"] for e in results["sizes"].values()) == sorted(vectors.GENERATORS)
    for entry in results["sizes"].values():
        methods = {r["method"]: r for r in entry["rows"]}
        for target in (0.9, 0.95, 0.99):
            row = methods[f"scann target={target}"]
            assert isinstance(row["met_on_tuning_queries"], bool) and "recall@10" in row
        assert "coarse-to-fine target=0.95" in methods and "exact d=16" in methods
    assert (out / "search.png").stat().st_size > 0
    assert "scann target=0.95" in (out / "search.md").read_text()


def test_bench_scann_rule_on_a_tiny_corpus(tmp_path):
    """`ldot bench scann_rule` (the measurement behind the size rule) runs and reports."""
    import json

    from ldot_jax.bench import scann_rule
    out = tmp_path / "rule"
    assert scann_rule.main(["--size", "25000", "--dim", "8", "--queries", "20", "--samples",
                            "5000,25000", "--corpora", "isotropic", "--out", str(out)]) == 0
    rows = json.loads((out / "scann_rule.json").read_text())["corpora"]["isotropic"]
    assert {r["sample"] for r in rows} == {5000, 25000} and len(rows) == 2 * 3
    assert all(0 <= r["recall@10"] <= 1 and r["qps"] > 0 for r in rows)
    assert "| 25,000 |" in (out / "scann_rule.md").read_text()
