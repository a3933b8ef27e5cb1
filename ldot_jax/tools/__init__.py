"""Layer 9, tools: the command lines (`ldot ...`), the demo and the multi-process launcher.
The benchmarks (ldot_jax/bench) and the experiment configs (ldot_jax/configs) are tools too."""
