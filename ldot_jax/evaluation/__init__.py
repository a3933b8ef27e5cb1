"""Layer 7, evaluation: recall definitions (recall), evaluators (evaluators: plug-ins by
name), the two-stage evaluation and its report (two_stage)."""
