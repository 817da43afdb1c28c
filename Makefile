# Two entry points for a fresh machine; each creates .venv itself (scripts/bootstrap.sh) and is quick once it exists.
PY := .venv/bin/python

.PHONY: env demo test test-fast bench

env:
	@bash scripts/bootstrap.sh

demo: env
	$(PY) -m openrlhf_irl demo $(ARGS)

# Two pytest workers, one test file each at a time (module fixtures such as a shared vLLM engine stay in one
# process); most end-to-end tests wait on process start-up, so two workers on two cores nearly halve the wall time.
test: env
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --no-loadscope-reorder --durations=15 tests

test-fast: env
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

bench: env
	$(PY) benchmarks/iq_vs_mle.py $(ARGS)
