# Two commands on a fresh machine: `make demo` (the real MovieLens-100K run) and `make test`.
# Both create .venv, install the pinned torch and build the extension with its CUDA kernels
# when a CUDA toolkit is found (setup.py locates it; S2META_CUDA=0 skips them).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
# No GPU is visible here, so name the architecture for the CUDA kernels to compile for.
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2
DEMO_OUT ?= runs/demo
DEMO_ARGS ?= --dataset ml100k --seed 0 --device cpu --out $(DEMO_OUT)

.PHONY: venv install demo test bench clean

$(VENV)/.deps-ok:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" numpy pandas pyyaml tqdm matplotlib \
		pytest pytest-benchmark hypothesis expecttest ninja "setuptools>=64" wheel
	# MovieLens-100K ships inside recbole; --no-deps avoids its multi-GB dependency chain.
	$(PY) -m pip install --quiet --no-deps recbole==1.2.1
	touch $@

venv: $(VENV)/.deps-ok

# --no-build-isolation: build against the torch in .venv (an isolated build pulls a second one).
# The stamp rebuilds the extension only when a source or build file changed (a build is minutes).
BUILD_INPUTS := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh') setup.py pyproject.toml
$(VENV)/.built: $(VENV)/.deps-ok $(BUILD_INPUTS)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.built
	$(PY) -c "import s2meta_fast; print(s2meta_fast.backend())"

demo: install
	$(VENV)/bin/s2meta run $(DEMO_ARGS)   # prints the results table; files in $(DEMO_OUT)

test: install
	S2META_REQUIRE_EXT=1 $(PY) -m pytest python_tests -q

# Every fused-vs-reference-vs-torch.compile comparison in benchmarks/bench_*.py (CUDA rows skipped
# without a GPU): pytest-benchmark's table, then each case's speed-up over the reference.
BENCH_JSON ?= runs/bench.json
bench: install
	mkdir -p $(dir $(BENCH_JSON))
	S2META_REQUIRE_EXT=1 $(PY) -m pytest benchmarks -q -p no:cacheprovider \
		--benchmark-columns=min,median,mean,rounds --benchmark-json=$(BENCH_JSON)
	$(PY) benchmarks/summarize.py $(BENCH_JSON)

clean:
	rm -rf build *.egg-info s2meta_fast/_C*.so s2meta_fast/_build_info.py $(VENV)/.built
