package compression

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

func encodeFile(tb testing.TB, f *safetensors.File) []byte {
	tb.Helper()
	var buf bytes.Buffer
	if err := safetensors.Encode(&buf, f.Tensors, f.Metadata); err != nil {
		tb.Fatal(err)
	}
	return buf.Bytes()
}

// roundTrip compresses src, serialises and re-parses the container, and decompresses it.
func roundTrip(tb testing.TB, src *safetensors.File, cfg Config) (*Result, *Restored, []byte) {
	tb.Helper()
	res, err := Compress(src, cfg)
	if err != nil {
		tb.Fatal(err)
	}
	container := encodeFile(tb, &safetensors.File{Tensors: res.Tensors, Metadata: res.Metadata})
	if int64(len(container)) != res.FileSize {
		tb.Fatalf("FileSize %d, encoded %d bytes", res.FileSize, len(container))
	}
	parsed, err := safetensors.Parse(container)
	if err != nil {
		tb.Fatal(err)
	}
	restored, err := Decompress(parsed, 0)
	if err != nil {
		tb.Fatal(err)
	}
	return res, restored, container
}

func TestRoundTripTinyLlamaShape(t *testing.T) {
	for _, dt := range []safetensors.DType{safetensors.F16, safetensors.BF16, safetensors.F32} {
		for _, g := range GroupSizes {
			t.Run(string(dt)+"/G"+itoa(g), func(t *testing.T) {
				// head_dim 128 for G = 128: groups never span rows.
				src := kvCache(t, 22, 4, 32, max(64, g), dt, 1)
				res, restored, _ := roundTrip(t, src, Config{GroupSize: g})
				if len(restored.Tensors) != len(src.Tensors) {
					t.Fatalf("%d tensors restored, want %d", len(restored.Tensors), len(src.Tensors))
				}
				if restored.Metadata["model_name"] != "synthetic" {
					t.Errorf("source metadata not restored: %v", restored.Metadata)
				}
				for i := range src.Tensors {
					a, b := &src.Tensors[i], &restored.Tensors[i]
					if a.Name != b.Name || a.DType != b.DType || len(a.Data) != len(b.Data) {
						t.Fatalf("tensor %d: %s %s %d bytes, want %s %s %d", i, b.Name, b.DType, len(b.Data), a.Name, a.DType, len(a.Data))
					}
					for j := range a.Shape {
						if a.Shape[j] != b.Shape[j] {
							t.Fatalf("%s: shape %v, want %v", a.Name, b.Shape, a.Shape)
						}
					}
				}
				// The report's quality must be what the restored file shows.
				var st tensorStats
				for i := range src.Tensors {
					x, y := decode(t, &src.Tensors[i]), decode(t, &restored.Tensors[i])
					for j := 0; j < len(x); j += g {
						var gs groupStats
						for k := j; k < j+g; k++ {
							gs.add(x[k], y[k])
						}
						st.addGroup(&gs, g)
					}
				}
				got, want := st.quality(), res.Quality
				if !near(got.RMSE, want.RMSE) || !near(got.SNRdB, want.SNRdB) || !near(got.CosineSimilarity, want.CosineSimilarity) || !near(got.MaxError, want.MaxError) {
					t.Errorf("quality from files %+v, report %+v", got, want)
				}
				// Two outlier channels per key row make this harder than plain Gaussian data.
				if res.Quality.CosineSimilarity < 0.97 || res.Quality.SNRdB < 12 {
					t.Errorf("quality too low for INT4 on Gaussian data: %+v", res.Quality)
				}
				wantBits := 4 + 16/float64(g)
				if bpe := 8 * float64(res.QuantizedPayloadBytes) / float64(res.QuantizedElements); bpe > wantBits+1e-9 {
					t.Errorf("bits per element %.4f > %.4f", bpe, wantBits)
				}
			})
		}
	}
}

// TestRatioF16G64 checks the on-disk ratio on a 2,048-token TinyLlama-shaped
// F16 cache, the size the benchmarks use.
func TestRatioF16G64(t *testing.T) {
	if testing.Short() {
		t.Skip("46 MB cache")
	}
	src := kvCache(t, 22, 4, 2048, 64, safetensors.F16, 3)
	orig := int64(len(encodeFile(t, src)))
	for name, cfg := range map[string]Config{"seed": SeedConfig(), "default": DefaultConfig()} {
		res, err := Compress(src, cfg)
		if err != nil {
			t.Fatal(err)
		}
		ratio := float64(orig) / float64(res.FileSize)
		if ratio < 3.70 {
			t.Errorf("%s: ratio %.4f < 3.70 (%d -> %d bytes)", name, ratio, orig, res.FileSize)
		}
		t.Logf("%s: ratio %.4f (%d -> %d bytes)", name, ratio, orig, res.FileSize)
	}
}

func TestDeterministic(t *testing.T) {
	src := kvCache(t, 4, 2, 16, 64, safetensors.F16, 5)
	_, _, a := roundTrip(t, src, Config{GroupSize: 64, Workers: 1})
	_, _, b := roundTrip(t, src, Config{GroupSize: 64, Workers: 7})
	if !bytes.Equal(a, b) {
		t.Fatal("container depends on the number of workers")
	}
}

func TestCompressErrors(t *testing.T) {
	nan := safetensors.Tensor{Name: "layer_0_key", DType: safetensors.F32, Shape: []int64{1, 64}, Data: make([]byte, 256)}
	nan.Data[3*4+2], nan.Data[3*4+3] = 0xc0, 0x7f // element 3 = NaN
	tests := []struct {
		name    string
		tensor  safetensors.Tensor
		cfg     Config
		wantErr error
	}{
		{"group does not divide", safetensors.Tensor{Name: "a", DType: safetensors.F16, Shape: []int64{2, 48}, Data: make([]byte, 192)}, DefaultConfig(), ErrGroupSize},
		{"float scalar", safetensors.Tensor{Name: "s", DType: safetensors.F32, Shape: []int64{}, Data: make([]byte, 4)}, DefaultConfig(), ErrGroupSize},
		{"NaN", nan, DefaultConfig(), ErrNonFinite},
		{"NaN with sparsity", nan, Config{GroupSize: 64, Sparsity: 0.5}, ErrNonFinite},
		{"bad config", safetensors.Tensor{Name: "a", DType: safetensors.U8, Shape: []int64{1}, Data: []byte{1}}, Config{GroupSize: 48}, ErrConfig},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Compress(&safetensors.File{Tensors: []safetensors.Tensor{tc.tensor}}, tc.cfg)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if tc.wantErr != ErrConfig && !bytes.Contains([]byte(err.Error()), []byte(tc.tensor.Name)) {
				t.Errorf("error %q does not name tensor %q", err, tc.tensor.Name)
			}
		})
	}
}

func TestStoredTensors(t *testing.T) {
	src := &safetensors.File{Tensors: []safetensors.Tensor{
		{Name: "ids", DType: safetensors.I64, Shape: []int64{3}, Data: []byte{1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0}},
		{Name: "mask", DType: safetensors.BOOL, Shape: []int64{2}, Data: []byte{1, 0}},
		{Name: "empty", DType: safetensors.F16, Shape: []int64{0, 7}, Data: []byte{}},
		{Name: "f8", DType: safetensors.F8E4M3, Shape: []int64{4}, Data: []byte{1, 2, 3, 4}},
	}}
	res, restored, _ := roundTrip(t, src, DefaultConfig())
	for i, tn := range restored.Tensors {
		if !bytes.Equal(tn.Data, src.Tensors[i].Data) || tn.DType != src.Tensors[i].DType {
			t.Errorf("%s not restored verbatim", tn.Name)
		}
		if res.PerTensor[i].Mode != ModeStored {
			t.Errorf("%s mode %s, want stored", tn.Name, res.PerTensor[i].Mode)
		}
	}
}

func TestSparsityRaisesCompression(t *testing.T) {
	src := kvCache(t, 2, 4, 64, 64, safetensors.F16, 9)
	dense, _, _ := roundTrip(t, src, Config{GroupSize: 64})
	sparse, restored, _ := roundTrip(t, src, Config{GroupSize: 64, Sparsity: 0.6})
	if sparse.FileSize >= dense.FileSize {
		t.Errorf("sparsity 0.6 gives %d bytes, dense %d", sparse.FileSize, dense.FileSize)
	}
	zeros, total := 0, 0
	for i := range restored.Tensors {
		for _, v := range decode(t, &restored.Tensors[i]) {
			total++
			if v == 0 {
				zeros++
			}
		}
	}
	if frac := float64(zeros) / float64(total); frac < 0.6 {
		t.Errorf("only %.3f of the reconstruction is zero", frac)
	}
}

// TestCorruptionDetected flips every bit of a small container, one at a time:
// each flip must make decompression fail rather than return other numbers.
func TestCorruptionDetected(t *testing.T) {
	src := kvCache(t, 1, 1, 2, 64, safetensors.F16, 11)
	_, _, container := roundTrip(t, src, DefaultConfig())
	buf := make([]byte, len(container))
	for bit := 0; bit < 8*len(container); bit++ {
		copy(buf, container)
		buf[bit/8] ^= 1 << (bit % 8)
		f, err := safetensors.Parse(buf)
		if err != nil {
			continue
		}
		if _, err := Decompress(f, 1); err == nil {
			t.Fatalf("flipping bit %d (byte %d, %q) went undetected", bit, bit/8, container[bit/8])
		}
	}
}

func TestDecompressRejects(t *testing.T) {
	src := kvCache(t, 1, 1, 2, 64, safetensors.F16, 13)
	res, err := Compress(src, DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	mutate := func(fn func(m map[string]string, ts []safetensors.Tensor) []safetensors.Tensor) *safetensors.File {
		m := make(map[string]string)
		for k, v := range res.Metadata {
			m[k] = v
		}
		ts := append([]safetensors.Tensor(nil), res.Tensors...)
		ts = fn(m, ts)
		return &safetensors.File{Metadata: m, Tensors: ts}
	}
	rechecksum := func(m map[string]string) {
		m[MetaIndexChecksum] = indexChecksum(m[MetaCodec], m[MetaTensors], m[MetaSourceMetadata])
	}
	tests := []struct {
		name    string
		file    *safetensors.File
		wantErr error
	}{
		{"plain safetensors", src, ErrNotContainer},
		{"future version", mutate(func(m map[string]string, ts []safetensors.Tensor) []safetensors.Tensor {
			m[MetaFormatVersion] = "3"
			return ts
		}), ErrVersion},
		{"version with a leading zero", mutate(func(m map[string]string, ts []safetensors.Tensor) []safetensors.Tensor {
			m[MetaFormatVersion] = "02"
			return ts
		}), ErrVersion},
		{"huff0 payload in a version-1 container", mutate(func(m map[string]string, ts []safetensors.Tensor) []safetensors.Tensor {
			m[MetaFormatVersion] = "1"
			m[MetaCodec] = strings.Replace(m[MetaCodec], `,"entropy":"auto"`, "", 1)
			m[MetaTensors] = strings.Replace(m[MetaTensors], `"encoding":"huff0"`, `"encoding":"zstd"`, 1)
			m[MetaTensors] = strings.Replace(m[MetaTensors], `"encoding":"stored"`, `"encoding":"huff0"`, 1)
			rechecksum(m)
			return ts
		}), ErrCorrupt},
		{"entropy policy in a version-1 codec", mutate(func(m map[string]string, ts []safetensors.Tensor) []safetensors.Tensor {
			m[MetaFormatVersion] = "1"
			rechecksum(m)
			return ts
		}), ErrCorrupt},
		{"index tampered", mutate(func(m map[string]string, ts []safetensors.Tensor) []safetensors.Tensor {
			m[MetaTensors] = m[MetaTensors][:len(m[MetaTensors])-1]
			return ts
		}), ErrChecksum},
		{"bad codec json", mutate(func(m map[string]string, ts []safetensors.Tensor) []safetensors.Tensor {
			m[MetaCodec] = "{"
			rechecksum(m)
			return ts
		}), ErrCorrupt},
		{"group size 48", mutate(func(m map[string]string, ts []safetensors.Tensor) []safetensors.Tensor {
			m[MetaCodec] = `{"scheme":"sym","bits":4,"group_size":48,"sparsity":0,"scale_dtype":"F16","rounding":"half_to_even","nibble_order":"low_first","checksum":"crc32c"}`
			rechecksum(m)
			return ts
		}), ErrCorrupt},
		{"missing payload", mutate(func(m map[string]string, ts []safetensors.Tensor) []safetensors.Tensor {
			return ts[1:]
		}), ErrCorrupt},
		{"extra payload", mutate(func(m map[string]string, ts []safetensors.Tensor) []safetensors.Tensor {
			return append(ts, safetensors.Tensor{Name: "junk", DType: safetensors.U8, Shape: []int64{1}, Data: []byte{0}})
		}), ErrCorrupt},
		{"payload bytes changed", mutate(func(m map[string]string, ts []safetensors.Tensor) []safetensors.Tensor {
			d := append([]byte(nil), ts[0].Data...)
			d[0] ^= 0x10
			ts[0].Data = d
			return ts
		}), ErrChecksum},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := Decompress(tc.file, 1); !errors.Is(err, tc.wantErr) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
		})
	}
}

func TestCompressFileLeavesNothingOnError(t *testing.T) {
	dir := t.TempDir()
	in := filepath.Join(dir, "in.safetensors")
	bad := kvCache(t, 1, 1, 2, 48, safetensors.F16, 1) // 48 is not divisible by 64
	if err := os.WriteFile(in, encodeFile(t, bad), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out.kvc")
	if _, err := CompressFile(in, out, DefaultConfig()); !errors.Is(err, ErrGroupSize) {
		t.Fatalf("err = %v, want ErrGroupSize", err)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("directory holds %d entries after a failed compress", len(entries))
	}
	if _, err := CompressFile(in, in, DefaultConfig()); err == nil {
		t.Fatal("compressing onto the input succeeded")
	}
}

func FuzzDecompress(f *testing.F) {
	for seed := uint64(0); seed < 3; seed++ {
		src := kvCache(f, 1, 1, 2, 128, safetensors.F16, seed)
		src.Tensors = append(src.Tensors, safetensors.Tensor{Name: "ids", DType: safetensors.I32, Shape: []int64{2}, Data: make([]byte, 8)})
		res, err := Compress(src, Config{GroupSize: 32 << seed})
		if err != nil {
			f.Fatal(err)
		}
		f.Add(encodeFile(f, &safetensors.File{Tensors: res.Tensors, Metadata: res.Metadata}))
	}
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		file, err := safetensors.Parse(data)
		if err != nil {
			return
		}
		restored, err := Decompress(file, 2)
		if err != nil {
			return
		}
		// Whatever decompresses must be a writable, consistent safetensors file.
		var buf bytes.Buffer
		if err := safetensors.Encode(&buf, restored.Tensors, restored.Metadata); err != nil {
			t.Fatalf("restored tensors do not encode: %v", err)
		}
	})
}

func TestRandomRoundTripsAreBounded(t *testing.T) {
	rng := rand.New(rand.NewPCG(4, 4))
	for trial := range 20 {
		g := GroupSizes[trial%3]
		x := make([]float32, 4*g)
		for i := range x {
			x[i] = float32(rng.NormFloat64() * 3)
		}
		codes := make([]byte, len(x)/2)
		scales := make([]uint16, 4)
		if _, err := quantizeTensor(f32Bytes(x), safetensors.F32, nil, g, codes, scales); err != nil {
			t.Fatal(err)
		}
		out := make([]byte, 4*len(x))
		dequantizeTensor(codes, scales, g, safetensors.F32, out)
		y := make([]float32, len(x))
		safetensors.DecodeFloat32(safetensors.F32, out, y)
		for i := range x {
			s := safetensors.F16ToF32(scales[i/g])
			if d := x[i] - y[i]; d > s/2*1.0001 || -d > s/2*1.0001 {
				t.Fatalf("trial %d element %d: |%v - %v| > scale/2 = %v", trial, i, x[i], y[i], s/2)
			}
		}
	}
}
