# make demo: set up a virtual environment and run the whole pipeline on built-in data (CPU, minutes)
# make test: set up the same environment and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch first, pinned to a release the tests pass with, so that requirements.txt's range installs
# nothing more (unpinned, pip takes the newest torch). On Linux PyPI's build brings several GB of
# CUDA packages; TORCH takes any pip arguments, e.g. the CPU build for the CPU demo:
#   make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
# A torch already in the environment (your CUDA build, or the one .ci/run installs) is kept.
TORCH ?= torch==2.13.0

# a stamp of its own (not bin/activate): a venv made beforehand, e.g. by .ci/run, still gets the requirements
$(STAMP): requirements.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -r requirements.txt
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests -q

# shorter than the tiny presets (500 tokenizer steps, 7 generator epochs), so that a fresh clone
# finishes within minutes on two cores; --overwrite: a second `make demo` starts the demo again
demo: $(STAMP)
	$(BIN)/python train_tok.py --preset tiny --device cpu --max-steps 300 --overwrite --out out/demo_tok
	$(BIN)/python train_gpt.py --preset tiny --device cpu --epochs 4 --tokenizer out/demo_tok/ckpt.pt \
		--overwrite --out out/demo_gpt
	$(BIN)/python sample.py --gpt out/demo_gpt/ckpt.pt --tokenizer out/demo_tok/ckpt.pt --device cpu \
		--classes 0,1,2,3,4,5,6,7,8,9 --num-per-class 8 --cfg-scale 4,4 --out out/demo_samples.png --check-classes synthetic

.PHONY: test demo
