# make run   - set up (first time) and start the app on http://127.0.0.1:7860
# make test  - set up (first time) and run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: run test setup bench clean

$(VENV)/.installed: pyproject.toml constraints-cpu.txt scripts/setup.sh
	bash scripts/setup.sh $(VENV)

setup: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) app.py $(ARGS)

test: $(VENV)/.installed
	bash scripts/setup-browser.sh
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache
