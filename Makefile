# Two commands: `make demo` runs the main job, `make test` the whole test suite. Both create or reuse .venv.
.PHONY: demo test test-fast lint setup clean

demo:
	@scripts/setup.sh base
	@scripts/demo.sh $(DEMO_ARGS)

test:
	@scripts/setup.sh test
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/python -m pytest -q --timeout=1200 --durations=20 $(PYTEST_ARGS)

test-fast:
	@scripts/setup.sh test
	.venv/bin/python -m pytest -q -m "not slow" --timeout=600 $(PYTEST_ARGS)

lint:
	@scripts/setup.sh test
	.venv/bin/ruff check src tests benchmarks

setup:
	@scripts/setup.sh test

clean:
	rm -rf .venv runs .pytest_cache
