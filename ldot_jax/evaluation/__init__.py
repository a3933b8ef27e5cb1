"""Layer 7, evaluation: recall definitions (recall), recall from ranked lists (ranked_lists),
the two-stage evaluation (two_stage) and its table and plot (report), and the evaluators a
training run lists in `config.evals` (evaluators/)."""
