# sdlite: the commands the README uses.
#   make test   create .venv if missing, install sdlite with its dev extras, run unit tests + every notebook (nbval)
#   make lab    open JupyterLab on notebooks/
PYTHON ?= python3
VENV ?= .venv
# Extra flags for `python -m venv`, e.g. VENV_FLAGS=--system-site-packages to reuse a torch you already have.
VENV_FLAGS ?=
# The torch we install when the venv has none. The CPU build: on a machine without a GPU never pull CUDA.
# Elsewhere: make install TORCH_SPEC=torch TORCH_INDEX=https://download.pytorch.org/whl/cpu (or .../cu124)
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install test unit notebooks lab demo clean-venv execute-notebook

$(PY):
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)

$(VENV)/.installed: $(PY) pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null && echo "keeping the installed torch" || \
	  $(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q --nbval-lax --nbval-current-env --nbval-sanitize-with tests/sanitize.cfg tests notebooks

unit: install
	$(PY) -m pytest -q tests

notebooks: install
	$(PY) -m pytest -q --nbval-lax --nbval-current-env --nbval-sanitize-with tests/sanitize.cfg notebooks

lab: install
	$(VENV)/bin/jupyter lab notebooks/

clean-venv:
	rm -rf $(VENV)

# Execute one notebook in place from a fresh kernel: make execute-notebook NB=notebooks/01_tokenization.ipynb
execute-notebook: install
	$(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=600 $(NB)
