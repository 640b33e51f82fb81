package compression

import (
	"os"
	"path/filepath"
	"testing"
)

// BenchmarkFiles runs CompressFile and DecompressFile on the benchmark cache
// written to a temporary folder (warm page cache, --no-sync): set beside
// BenchmarkCompress and BenchmarkDecompress it shows what the file path adds
// to the in-memory codec. Throughput counts the cache's bytes.
func BenchmarkFiles(b *testing.B) {
	src := benchCache(b, 64)
	dir := b.TempDir()
	in, kvc, back := filepath.Join(dir, "in"), filepath.Join(dir, "c.kvc"), filepath.Join(dir, "back")
	if err := os.WriteFile(in, encodeFile(b, src), 0o644); err != nil {
		b.Fatal(err)
	}
	for _, c := range []struct {
		name string
		cfg  Config
	}{{"seed", SeedConfig()}, {"default", DefaultConfig()}} {
		cfg := c.cfg
		cfg.NoSync = true
		b.Run("compress/"+c.name, func(b *testing.B) {
			b.SetBytes(inputBytes(src))
			for b.Loop() {
				if _, err := CompressFile(in, kvc, cfg); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run("decompress/"+c.name, func(b *testing.B) {
			if _, err := CompressFile(in, kvc, cfg); err != nil {
				b.Fatal(err)
			}
			b.SetBytes(inputBytes(src))
			b.ResetTimer()
			for b.Loop() {
				if _, err := DecompressFile(kvc, back, cfg); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
