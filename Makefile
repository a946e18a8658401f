# The two commands of the README's quick start, and the checks CI runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Run the main job (jobs/example.toml) on the sample data against the bundled
# simulator: no account or API key needed.
demo: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	$(BIN)/runner submit jobs/example.toml

# Install the package with its test extras (Ray included, for the distributed
# engine's tests), lint, type-check, run the suite.
test: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,ray]'
	$(BIN)/ruff check runner tests bench sample_data
	$(BIN)/ruff format --check runner tests bench sample_data
	$(BIN)/mypy
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) out state .pytest_cache .mypy_cache .ruff_cache
