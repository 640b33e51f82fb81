package compression

import (
	"testing"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// benchCache is a 2,048-token TinyLlama-shaped F16 cache: 22 layers × (key,
// value) × [1, 4, 2048, 64], 46 MB. G = 128 needs a last dimension of 128, so
// that case uses [1, 2, 2048, 128]: the same number of bytes.
func benchCache(b *testing.B, g int) *safetensors.File {
	if g > 64 {
		return kvCache(b, 22, 2, 2048, 128, safetensors.F16, 1)
	}
	return kvCache(b, 22, 4, 2048, 64, safetensors.F16, 1)
}

// reportCPU adds the throughput per CPU-second (user and system time of the
// whole process, garbage collector included) to a benchmark's figures: on a
// host shared with other work, wall time measures the neighbours as much as
// the code, CPU time much less so. Both cores busy, the wall throughput
// would be about twice this figure.
func reportCPU(b *testing.B, start float64, bytes int64) {
	if cpu := cpuSeconds() - start; cpu > 0 && start > 0 {
		b.ReportMetric(float64(bytes)*float64(b.N)/cpu/1e6, "MB/cpu-s")
	}
}

func inputBytes(f *safetensors.File) int64 {
	var n int64
	for _, t := range f.Tensors {
		n += int64(len(t.Data))
	}
	return n
}

func BenchmarkCompress(b *testing.B) {
	for _, g := range GroupSizes {
		b.Run("G"+itoa(g), func(b *testing.B) {
			src := benchCache(b, g)
			b.SetBytes(inputBytes(src))
			b.ResetTimer()
			start := cpuSeconds()
			for b.Loop() {
				if _, err := Compress(src, Config{GroupSize: g}); err != nil {
					b.Fatal(err)
				}
			}
			reportCPU(b, start, inputBytes(src))
		})
	}
}

// benchDecompress measures decoding a container of src written with cfg;
// throughput counts restored bytes.
func benchDecompress(b *testing.B, src *safetensors.File, cfg Config) {
	res, err := Compress(src, cfg)
	if err != nil {
		b.Fatal(err)
	}
	container := asContainer(b, res)
	b.SetBytes(inputBytes(src))
	b.ResetTimer()
	start := cpuSeconds()
	for b.Loop() {
		if _, err := Decompress(container, 0); err != nil {
			b.Fatal(err)
		}
	}
	reportCPU(b, start, inputBytes(src))
}

func BenchmarkDecompress(b *testing.B) {
	for _, g := range GroupSizes {
		b.Run("G"+itoa(g), func(b *testing.B) { benchDecompress(b, benchCache(b, g), Config{GroupSize: g}) })
	}
}

// schemeBenchmarks are the codec options BenchmarkCompressScheme measures.
// Those marked scalar are measured a second time with the scalar encoders
// alone (what a build without GOEXPERIMENT=simd runs), as the reference of
// the same run; exact ones once more with Config.ExactMetrics, the error
// measured in the original basis after an inverse rotation.
var schemeBenchmarks = []struct {
	name          string
	cfg           Config
	scalar, exact bool
}{
	{"default", DefaultConfig(), true, true},
	{"default-lz4", withEntropy(DefaultConfig(), EntropyLZ4), true, false},
	{"default-none", withEntropy(DefaultConfig(), EntropyNone), false, false},
	{"hadamard", Config{GroupSize: 64, Rotate: RotateHadamard}, false, true},
	{"hadamard-token-keys-sink1", Config{GroupSize: 64, Rotate: RotateHadamard, KeyAxis: KeyAxisToken, Sink: 1}, false, false},
	{"asym", Config{GroupSize: 64, Scheme: SchemeAsym}, true, false},
	{"hadamard-asym-channel-sink1", Config{GroupSize: 64, Rotate: RotateHadamard, Scheme: SchemeAsym, KeyAxis: KeyAxisChannel, Sink: 1}, true, true},
	{"b3", Config{GroupSize: 64, Bits: 3}, true, false},
	{"b3-default", Config{GroupSize: 64, Rotate: RotateHadamard, KeyAxis: KeyAxisChannel, Sink: 1, Bits: 3}, true, true},
	{"b2", Config{GroupSize: 64, Bits: 2}, true, false},
	{"b2-asym-default", Config{GroupSize: 64, Rotate: RotateHadamard, Scheme: SchemeAsym, KeyAxis: KeyAxisChannel, Sink: 1, Bits: 2}, true, true},
}

// BenchmarkCompressScheme measures the general encoder on the same cache:
// name/vector is what make builds (the vector encoders where the CPU has
// AVX2), name/scalar the scalar encoders alone, name/exact-metrics the
// vector encoders measuring in the original basis.
func BenchmarkCompressScheme(b *testing.B) {
	run := func(b *testing.B, cfg Config, vector bool) {
		defer func(old bool) { simdEnabled = old }(simdEnabled)
		simdEnabled = vector && haveSIMD
		src := benchCache(b, 64)
		b.SetBytes(inputBytes(src))
		b.ResetTimer()
		start := cpuSeconds()
		for b.Loop() {
			if _, err := Compress(src, cfg); err != nil {
				b.Fatal(err)
			}
		}
		reportCPU(b, start, inputBytes(src))
	}
	for _, c := range schemeBenchmarks {
		b.Run(c.name+"/vector", func(b *testing.B) { run(b, c.cfg, true) })
		if c.scalar {
			b.Run(c.name+"/scalar", func(b *testing.B) { run(b, c.cfg, false) })
		}
		if c.exact {
			exact := c.cfg
			exact.ExactMetrics = true
			b.Run(c.name+"/exact-metrics", func(b *testing.B) { run(b, exact, true) })
		}
	}
}

// BenchmarkDecompressDefault decodes a container written with DefaultConfig
// (rotation and an exact first position: the general decoder).
func BenchmarkDecompressDefault(b *testing.B) { benchDecompress(b, benchCache(b, 64), DefaultConfig()) }

// BenchmarkDecompressScheme decodes containers of the options that
// BenchmarkCompressScheme measures with the scalar reference too.
func BenchmarkDecompressScheme(b *testing.B) {
	for _, c := range schemeBenchmarks {
		if c.scalar {
			b.Run(c.name, func(b *testing.B) { benchDecompress(b, benchCache(b, 64), c.cfg) })
		}
	}
}

// BenchmarkDecompressDefaultLZ4 is the default codec with version 1's entropy
// policy (LZ4 or stored), the reference for the cost of the entropy stage.
func BenchmarkDecompressDefaultLZ4(b *testing.B) {
	benchDecompress(b, benchCache(b, 64), withEntropy(DefaultConfig(), EntropyLZ4))
}

func withEntropy(c Config, policy string) Config {
	c.Entropy = policy
	return c
}
