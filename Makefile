# The two commands of the README:
#   make start   install everything (idempotent) and start llmctl on the default model
#   make test    install everything (idempotent) and run the test suite
.PHONY: setup start stop status test unit lint

setup:
	bash tools/setup.sh

start: setup
	.venv/bin/llmctl start

stop:
	.venv/bin/llmctl stop

status:
	.venv/bin/llmctl status

test: setup lint
	.venv/bin/python -m pytest -q

# The import contracts of pyproject.toml ([tool.importlinter]), checked by import-linter.
# It reads a package from one directory tree, so .lint/llmctl lays the folders out as
# they are installed (links to common/, control/, ...), exactly as package-dir maps them.
lint: setup
	rm -rf .lint && mkdir -p .lint/llmctl && cp llmctl/__init__.py .lint/llmctl/
	for d in common control dataplane worker tools; do ln -s ../../$$d .lint/llmctl/$$d; done
	cd .lint && ../.venv/bin/lint-imports --config ../pyproject.toml --no-cache

unit:
	.venv/bin/python -m pytest -q -m "not integration"
