# make demo: set up a virtual environment and run the whole pipeline on built-in data (CPU, minutes)
# make test: set up the same environment and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# a stamp of its own (not bin/activate): a venv made beforehand, e.g. by .ci/run, still gets the requirements
$(STAMP): requirements.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests -q

demo: $(STAMP)
	$(BIN)/python train_tok.py --preset tiny --device cpu --out out/demo_tok
	$(BIN)/python train_gpt.py --preset tiny --device cpu --tokenizer out/demo_tok/ckpt.pt --out out/demo_gpt
	$(BIN)/python sample.py --gpt out/demo_gpt/ckpt.pt --tokenizer out/demo_tok/ckpt.pt --device cpu \
		--classes 0,1,2,3,4,5,6,7,8,9 --num-per-class 8 --cfg-scale 4,4 --out out/demo_samples.png --check-classes synthetic

.PHONY: test demo
