# The two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON_BIN ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Reinstall whenever the declared dependencies change.
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)
# 8 simulated CPU devices, so multi-device code paths run on a CPU-only machine.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(PY) -m ldot_jax.demo --workdir runs/demo

test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadgroup

clean:
	rm -rf $(VENV) runs build *.egg-info
