package compression

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

func TestBitPackingRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 1))
	for _, bits := range BitWidths {
		for _, n := range []int{0, 1, 7, 8, 9, 100} {
			vals := make([]uint32, n)
			w := bitWriter{}
			for i := range vals {
				vals[i] = uint32(rng.IntN(1 << bits))
				w.put(vals[i], uint(bits))
			}
			out := w.flush()
			if len(out) != (n*bits+7)/8 {
				t.Fatalf("bits %d n %d: %d bytes", bits, n, len(out))
			}
			r := bitReader{in: out}
			for i, want := range vals {
				if got := r.get(uint(bits)); got != want {
					t.Fatalf("bits %d element %d: %d, want %d", bits, i, got, want)
				}
			}
		}
	}
	// Four-bit codes are the version-1 nibble order: element 2i in the low nibble.
	w := bitWriter{}
	w.put(0x3, 4)
	w.put(0xa, 4)
	if got := w.flush(); got[0] != 0xa3 {
		t.Fatalf("nibble order: %#x", got[0])
	}
}

func TestRotationIsOrthonormal(t *testing.T) {
	rng := rand.New(rand.NewPCG(2, 2))
	for _, n := range []int{1, 2, 8, 64, 128} {
		r := newRotation(n)
		v := make([]float32, 3*n)
		for i := range v {
			v[i] = float32(rng.NormFloat64())
		}
		orig := append([]float32(nil), v...)
		r.forward(v)
		var a, b float64
		for i := range v {
			a += float64(orig[i]) * float64(orig[i])
			b += float64(v[i]) * float64(v[i])
		}
		if math.Abs(a-b) > 1e-4*a {
			t.Errorf("n=%d: norm %v -> %v", n, a, b)
		}
		r.inverse(v)
		for i := range v {
			if math.Abs(float64(v[i]-orig[i])) > 1e-5 {
				t.Fatalf("n=%d element %d: %v, want %v", n, i, v[i], orig[i])
			}
		}
	}
	if hadamardBlock(64) != 64 || hadamardBlock(96) != 32 || hadamardBlock(80) != 16 {
		t.Error("hadamardBlock")
	}
}

// TestGeneralPathMatchesTunedPath encodes the version-1 scheme with both
// encoders: the bytes and the measured quality must agree.
func TestGeneralPathMatchesTunedPath(t *testing.T) {
	for _, dt := range []safetensors.DType{safetensors.F16, safetensors.BF16, safetensors.F32} {
		src := kvCache(t, 2, 2, 8, 64, dt, 21)
		for _, tn := range src.Tensors {
			for _, g := range []int{32, 64} {
				p := tensorPlan{Scheme: SchemeSym, Bits: 4, Axis: AxisLast, Rotate: RotateNone, Group: g}
				n := int(tn.NumElements())
				codes, scales := make([]byte, n/2), make([]uint16, n/g)
				st, err := quantizeTensor(tn.Data, tn.DType, nil, g, codes, scales)
				if err != nil {
					t.Fatal(err)
				}
				enc, err := encodeGeneral(&tn, p, 0, &generalScratch{})
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(enc.codes, codes) {
					t.Fatalf("%s %s G%d: codes differ", dt, tn.Name, g)
				}
				for i, s := range scales {
					if binary.LittleEndian.Uint16(enc.scales[2*i:]) != s {
						t.Fatalf("%s %s G%d: scale %d differs", dt, tn.Name, g, i)
					}
				}
				a, b := st.quality(), enc.stats.quality()
				if !near(a.RMSE, b.RMSE) || math.Abs(float64(a.CosineSimilarity-b.CosineSimilarity)) > 1e-5 || a.MaxError != b.MaxError {
					t.Fatalf("%s %s G%d: quality %+v vs %+v", dt, tn.Name, g, a, b)
				}
				// And the general decoder rebuilds what the tuned one does.
				want := make([]byte, len(tn.Data))
				dequantizeTensor(codes, scales, g, tn.DType, want)
				got := make([]byte, len(tn.Data))
				e := Entry{Name: tn.Name, DType: string(tn.DType), Shape: tn.Shape, Mode: ModeInt4}
				if err := decodeGeneral(&e, p, enc.codes, enc.scales, nil, nil, got, &generalScratch{}); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, want) {
					t.Fatalf("%s %s G%d: decoders disagree", dt, tn.Name, g)
				}
			}
		}
	}
}

func schemeConfigs() []Config {
	return []Config{
		{GroupSize: 64, Rotate: RotateHadamard},
		{GroupSize: 64, Scheme: SchemeAsym},
		{GroupSize: 32, Scheme: SchemeAsym, Rotate: RotateHadamard, KeyAxis: KeyAxisChannel, Sink: 1},
		{GroupSize: 64, KeyAxis: KeyAxisChannel},
		{GroupSize: 64, Sink: 3},
		{GroupSize: 64, Bits: 8},
		{GroupSize: 128, Bits: 2, Scheme: SchemeAsym},
		{GroupSize: 64, Bits: 3, Rotate: RotateHadamard},
		{GroupSize: 64, KeyBits: 8, ValueBits: 4},
		{GroupSize: 32, Scheme: SchemeAsym, Sparsity: 0.3, Sink: 2},
	}
}

func TestSchemesRoundTrip(t *testing.T) {
	for _, cfg := range schemeConfigs() {
		for _, dt := range []safetensors.DType{safetensors.F16, safetensors.BF16, safetensors.F32} {
			name := codecName(cfg) + "/" + string(dt)
			t.Run(name, func(t *testing.T) {
				src := kvCache(t, 2, 3, 37, 128, dt, 5) // 37 tokens: partial groups along the sequence
				// The report must be what the restored files show: measured
				// in the original basis (TestRotatedMetrics covers the other).
				exact := cfg
				exact.ExactMetrics = true
				res, restored, _ := roundTrip(t, src, exact)
				var st tensorStats
				for i := range src.Tensors {
					a, b := &src.Tensors[i], &restored.Tensors[i]
					if a.Name != b.Name || a.DType != b.DType || len(a.Data) != len(b.Data) {
						t.Fatalf("%s not restored in kind", a.Name)
					}
					x, y := decode(t, a), decode(t, b)
					var gs groupStats
					for j := range x {
						gs.add(x[j], y[j])
						if j%512 == 511 {
							st.addGroup(&gs, 0)
							gs = groupStats{maxErr: gs.maxErr}
						}
					}
					st.addGroup(&gs, 0)
					st.n += int64(len(x))
					// Sink rows are bit-exact.
					rowBytes := cfg.Sink * 128 * dt.Bits() / 8
					seqBytes := 37 * 128 * dt.Bits() / 8
					for o := 0; o < 3; o++ {
						if !bytes.Equal(a.Data[o*seqBytes:o*seqBytes+rowBytes], b.Data[o*seqBytes:o*seqBytes+rowBytes]) {
							t.Fatalf("%s: sink rows of head %d changed", a.Name, o)
						}
					}
				}
				got := st.quality()
				if !near(got.RMSE, res.Quality.RMSE) || math.Abs(float64(got.CosineSimilarity-res.Quality.CosineSimilarity)) > 1e-5 || got.MaxError != res.Quality.MaxError {
					t.Errorf("quality from files %+v, report %+v", got, res.Quality)
				}
				minCos := map[int]Metric{2: 0.75, 3: 0.9, 4: 0.96, 8: 0.9999}[cfg.bits()]
				if res.Quality.CosineSimilarity < minCos {
					t.Errorf("cosine %v below %v", res.Quality.CosineSimilarity, minCos)
				}
			})
		}
	}
}

func codecName(c Config) string {
	return or(c.Scheme, "sym") + "-" + or(c.Rotate, "none") + "-" + or(c.KeyAxis, "token") + "-b" + itoa(c.bits()) +
		"-k" + itoa(c.keyBits()) + "-v" + itoa(c.valueBits()) + "-g" + itoa(c.GroupSize) + "-s" + itoa(c.Sink)
}

func TestSchemesImproveOutlierKeys(t *testing.T) {
	src := kvCache(t, 4, 4, 64, 64, safetensors.F16, 9)
	base, _, _ := roundTrip(t, src, Config{GroupSize: 64})
	for _, cfg := range []Config{
		{GroupSize: 64, Rotate: RotateHadamard},
		{GroupSize: 64, Scheme: SchemeAsym, KeyAxis: KeyAxisChannel},
		{GroupSize: 64, Bits: 8},
	} {
		res, _, _ := roundTrip(t, src, cfg)
		if res.Quality.SNRdB <= base.Quality.SNRdB {
			t.Errorf("%s: SNR %.2f dB, not better than the seed scheme's %.2f dB", codecName(cfg), res.Quality.SNRdB, base.Quality.SNRdB)
		}
	}
}

func TestSchemeConfigErrors(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		want string
	}{
		{"scheme", Config{GroupSize: 64, Scheme: "nf4"}, `[sym asym nf], got "nf4"`},
		{"rotate", Config{GroupSize: 64, Rotate: "random"}, `[none hadamard], got "random"`},
		{"key axis", Config{GroupSize: 64, KeyAxis: "head"}, `[token channel], got "head"`},
		{"bits", Config{GroupSize: 64, Bits: 5}, `[2 3 4 8], got 5`},
		{"key bits", Config{GroupSize: 64, KeyBits: 16}, `key bits must be one of [2 3 4 8], got 16`},
		{"sink", Config{GroupSize: 64, Sink: -1}, `got -1`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.cfg.Validate()
			if !errors.Is(err, ErrConfig) || !bytes.Contains([]byte(err.Error()), []byte(tc.want)) {
				t.Fatalf("Validate() = %v, want ErrConfig with %q", err, tc.want)
			}
		})
	}
}

func TestRoles(t *testing.T) {
	for name, want := range map[string]string{"layer_0_key": "key", "layer_12_value": "value", "layer_01_key": "other", "k": "other", "layer_3_keys": "other"} {
		if got := Role(name); got != want {
			t.Errorf("Role(%q) = %q, want %q", name, got, want)
		}
	}
}

// TestGroupDecodeTables checks the table-driven decoding of byte-aligned 2-
// and 3-bit groups against decoding code by code, for both schemes.
func TestGroupDecodeTables(t *testing.T) {
	rng := rand.New(rand.NewPCG(8, 9))
	for _, scheme := range []string{SchemeSym, SchemeAsym} {
		for _, bits := range []int{2, 3} {
			gc := newGroupCodec(tensorPlan{Scheme: scheme, Bits: bits})
			codes := make([]byte, 3*64*bits/8)
			for i := range codes {
				codes[i] = byte(rng.Uint32())
			}
			s, mv := float32(0.37), float32(-1.25)
			got := make([]float32, 3*64)
			r := bitReader{in: codes}
			for g := range 3 {
				gc.decode(&r, s, mv, got[64*g:64*(g+1)])
			}
			ref := bitReader{in: codes}
			shift := 32 - uint(bits)
			for i, v := range got {
				u := ref.get(uint(bits))
				q := int32(u)
				if scheme == SchemeSym {
					q = int32(u<<shift) >> shift
				}
				if want := gc.value(q, s, mv); v != want {
					t.Fatalf("%s %d bits, element %d: %g, want %g", scheme, bits, i, v, want)
				}
			}
		}
	}
}
