# The two commands of the README:
#   make start   install everything (idempotent) and start llmctl on the default model
#   make test    install everything (idempotent) and run the test suite
.PHONY: setup start stop status test unit

setup:
	bash tools/setup.sh

start: setup
	.venv/bin/llmctl start

stop:
	.venv/bin/llmctl stop

status:
	.venv/bin/llmctl status

test: setup
	.venv/bin/python -m pytest -q

unit:
	.venv/bin/python -m pytest -q -m "not integration"
