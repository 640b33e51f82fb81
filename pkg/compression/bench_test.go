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
			for b.Loop() {
				if _, err := Compress(src, Config{GroupSize: g}); err != nil {
					b.Fatal(err)
				}
			}
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
	for b.Loop() {
		if _, err := Decompress(container, 0); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDecompress(b *testing.B) {
	for _, g := range GroupSizes {
		b.Run("G"+itoa(g), func(b *testing.B) { benchDecompress(b, benchCache(b, g), Config{GroupSize: g}) })
	}
}

// BenchmarkCompressScheme measures the general encoder on the same cache.
func BenchmarkCompressScheme(b *testing.B) {
	for _, c := range []struct {
		name string
		cfg  Config
	}{
		{"default", DefaultConfig()},
		{"default-lz4", withEntropy(DefaultConfig(), EntropyLZ4)},
		{"default-none", withEntropy(DefaultConfig(), EntropyNone)},
		{"hadamard", Config{GroupSize: 64, Rotate: RotateHadamard}},
		{"hadamard-token-keys-sink1", Config{GroupSize: 64, Rotate: RotateHadamard, KeyAxis: KeyAxisToken, Sink: 1}},
		{"asym", Config{GroupSize: 64, Scheme: SchemeAsym}},
		{"hadamard-asym-channel-sink1", Config{GroupSize: 64, Rotate: RotateHadamard, Scheme: SchemeAsym, KeyAxis: KeyAxisChannel, Sink: 1}},
	} {
		b.Run(c.name, func(b *testing.B) {
			src := benchCache(b, 64)
			b.SetBytes(inputBytes(src))
			b.ResetTimer()
			for b.Loop() {
				if _, err := Compress(src, c.cfg); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkDecompressDefault decodes a container written with DefaultConfig
// (rotation and an exact first position: the general decoder).
func BenchmarkDecompressDefault(b *testing.B) { benchDecompress(b, benchCache(b, 64), DefaultConfig()) }

// BenchmarkDecompressDefaultLZ4 is the default codec with version 1's entropy
// policy (LZ4 or stored), the reference for the cost of the entropy stage.
func BenchmarkDecompressDefaultLZ4(b *testing.B) {
	benchDecompress(b, benchCache(b, 64), withEntropy(DefaultConfig(), EntropyLZ4))
}

func withEntropy(c Config, policy string) Config {
	c.Entropy = policy
	return c
}
