package compression

import (
	"bytes"
	"errors"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

func TestQuantizeCode(t *testing.T) {
	tests := []struct {
		name string
		v, s float32
		want int32
	}{
		{"zero", 0, 1, 0},
		{"exact", 3, 1, 3},
		{"half rounds to even (down)", 2.5, 1, 2},
		{"half rounds to even (up)", 3.5, 1, 4},
		{"negative half to even", -2.5, 1, -2},
		{"negative half to even (away)", -1.5, 1, -2},
		{"just above half", 2.5000002, 1, 3},
		{"clamp high", 7.6, 1, 7},
		{"clamp low", -9, 1, -8},
		{"max magnitude", 7, 1, 7},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := quantizeCode(tc.v, tc.s); got != tc.want {
				t.Fatalf("quantizeCode(%v, %v) = %d, want %d", tc.v, tc.s, got, tc.want)
			}
		})
	}
}

func TestQuantizeTensorRules(t *testing.T) {
	tests := []struct {
		name      string
		x         []float32
		g         int
		wantScale []float32 // as float32 values of the float16 scales
		wantCodes []int     // per element
		wantErr   error
	}{
		{
			name:      "zeros give scale 0 and code 0",
			x:         make([]float32, 32),
			g:         32,
			wantScale: []float32{0},
			wantCodes: make([]int, 32),
		},
		{
			name:      "max maps to 7, min to -7",
			x:         append([]float32{7, -7, 3.5, 0.5}, make([]float32, 28)...),
			g:         32,
			wantScale: []float32{1},
			wantCodes: append([]int{7, -7, 4, 0}, make([]int, 28)...),
		},
		{
			name:      "two groups with their own scales",
			x:         append(append([]float32{14}, make([]float32, 31)...), append([]float32{-0.7}, make([]float32, 31)...)...),
			g:         32,
			wantScale: []float32{2, f16(0.7 / 7)},
			wantCodes: append(append([]int{7}, make([]int, 31)...), append([]int{-7}, make([]int, 31)...)...),
		},
		{
			name:    "NaN is refused",
			x:       append([]float32{float32(math.NaN())}, make([]float32, 31)...),
			g:       32,
			wantErr: ErrNonFinite,
		},
		{
			name:    "Inf is refused",
			x:       append(make([]float32, 31), float32(math.Inf(-1))),
			g:       32,
			wantErr: ErrNonFinite,
		},
		{
			name:    "scale beyond float16 is refused",
			x:       append([]float32{1e6}, make([]float32, 31)...),
			g:       32,
			wantErr: ErrScaleOverflow,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			codes := make([]byte, len(tc.x)/2)
			scales := make([]uint16, len(tc.x)/tc.g)
			st, err := quantizeTensor(f32Bytes(tc.x), safetensors.F32, nil, tc.g, codes, scales)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if tc.wantErr != nil {
				return
			}
			for i, s := range scales {
				if got := safetensors.F16ToF32(s); got != tc.wantScale[i] {
					t.Errorf("scale %d = %v, want %v", i, got, tc.wantScale[i])
				}
			}
			for i, want := range tc.wantCodes {
				b := codes[i/2]
				nib := b & 0xf // low nibble holds the even element
				if i%2 == 1 {
					nib = b >> 4
				}
				if got := int(int8(nib<<4) >> 4); got != int(want) {
					t.Errorf("code %d = %d, want %d", i, got, want)
				}
			}
			if st.n != int64(len(tc.x)) {
				t.Errorf("stats count %d", st.n)
			}
		})
	}
}

func TestZeroGroupReconstructsExactZeros(t *testing.T) {
	x := make([]float32, 64)
	x[40] = 1 // second group non-zero
	codes := make([]byte, 32)
	scales := make([]uint16, 2)
	if _, err := quantizeTensor(f16Bytes(x), safetensors.F16, nil, 32, codes, scales); err != nil {
		t.Fatal(err)
	}
	out := make([]byte, 128)
	dequantizeTensor(codes, scales, 32, safetensors.F16, out)
	for i := 0; i < 32; i++ {
		if out[2*i] != 0 || out[2*i+1] != 0 {
			t.Fatalf("element %d of the zero group is not +0: %x %x", i, out[2*i], out[2*i+1])
		}
	}
}

func TestSparsify(t *testing.T) {
	tests := []struct {
		name     string
		x        []float32
		fraction float64
		want     []float32
	}{
		{"none", []float32{1, -2, 3, 4}, 0, []float32{1, -2, 3, 4}},
		{"half", []float32{1, -2, 3, -0.5}, 0.5, []float32{0, -2, 3, 0}},
		{"floor of fraction", []float32{1, -2, 3, -0.5}, 0.3, []float32{1, -2, 3, 0}},
		{"ties all zeroed", []float32{1, -1, 1, 5}, 0.25, []float32{0, 0, 0, 5}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			x := append([]float32(nil), tc.x...)
			sparsify(x, tc.fraction, make([]float32, len(x)))
			for i := range x {
				if x[i] != tc.want[i] {
					t.Fatalf("got %v, want %v", x, tc.want)
				}
			}
		})
	}
}

func TestSelectKth(t *testing.T) {
	a := []float32{5, 3, 9, 1, 1, 7, 3, 0, 2}
	sorted := []float32{0, 1, 1, 2, 3, 3, 5, 7, 9}
	for k := range a {
		b := append([]float32(nil), a...)
		if got := selectKth(b, k); got != sorted[k] {
			t.Errorf("k=%d: %v, want %v", k, got, sorted[k])
		}
	}
}

func TestConfigValidate(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		ok   bool
	}{
		{"default", DefaultConfig(), true},
		{"g32", Config{GroupSize: 32}, true},
		{"g128 sparse", Config{GroupSize: 128, Sparsity: 0.99}, true},
		{"g16", Config{GroupSize: 16}, false},
		{"g0", Config{}, false},
		{"sparsity 1", Config{GroupSize: 64, Sparsity: 1}, false},
		{"negative sparsity", Config{GroupSize: 64, Sparsity: -0.1}, false},
		{"NaN sparsity", Config{GroupSize: 64, Sparsity: math.NaN()}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.cfg.Validate()
			if (err == nil) != tc.ok {
				t.Fatalf("Validate() = %v, want ok=%v", err, tc.ok)
			}
			if err != nil && !errors.Is(err, ErrConfig) {
				t.Fatalf("error %v does not wrap ErrConfig", err)
			}
		})
	}
}

func TestQualityLevel(t *testing.T) {
	tests := []struct {
		name       string
		q          Quality
		want       string
		violations int
	}{
		{"excellent", Quality{RMSE: 0.005, SNRdB: 45, CosineSimilarity: 1}, QualityExcellent, 0},
		{"good", Quality{RMSE: 0.005, SNRdB: 35, CosineSimilarity: 1}, QualityGood, 0},
		{"acceptable", Quality{RMSE: 0.06, SNRdB: 25, CosineSimilarity: 0.999}, QualityAcceptable, 0},
		// The seed's absolute rule called this POOR (RMSE >= 0.10); the
		// error is 8.9 % of the signal's RMS, whatever its scale.
		{"large values, high snr", Quality{RMSE: 0.15, SNRdB: 21, CosineSimilarity: 0.996}, QualityAcceptable, 0},
		{"huge values, excellent", Quality{RMSE: 3, SNRdB: 41, CosineSimilarity: 1}, QualityExcellent, 0},
		// Small values, small RMSE, but the error is as large as a fifth of the signal.
		{"tiny rmse, low snr", Quality{RMSE: 0.001, SNRdB: 14, CosineSimilarity: 0.98}, QualityPoor, 2},
		{"snr at the limit", Quality{RMSE: 0.01, SNRdB: 18, CosineSimilarity: 0.995}, QualityPoor, 1},
		{"cosine at the limit", Quality{RMSE: 0.01, SNRdB: 45, CosineSimilarity: 0.99}, QualityPoor, 1},
		{"nan", Quality{RMSE: Metric(math.NaN()), SNRdB: Metric(math.NaN()), CosineSimilarity: Metric(math.NaN())}, QualityPoor, 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.q.Level(); got != tc.want {
				t.Errorf("Level() = %s, want %s", got, tc.want)
			}
			if v := tc.q.Violations(); len(v) != tc.violations {
				t.Errorf("Violations() = %q, want %d", v, tc.violations)
			}
		})
	}
}

func TestQualityViolationText(t *testing.T) {
	v := (Quality{RMSE: 0.5, SNRdB: 10, CosineSimilarity: 0.995}).Violations()
	want := "snr_db 10 <= 18 (rmse is 31.6% of the signal's rms, limit 12.6%)"
	if len(v) != 1 || v[0] != want {
		t.Fatalf("Violations() = %q, want [%q]", v, want)
	}
	if r := (Quality{SNRdB: 20}).RelativeRMSE(); !near(r, 0.1) {
		t.Errorf("RelativeRMSE at 20 dB = %g, want 0.1", r)
	}
}

// The verdict does not depend on the scale of the values: the same cache
// multiplied by 1/64 or by 64 (exact in float32) gets the same level.
func TestQualityLevelScaleFree(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
	}{
		{"default", DefaultConfig()},
		{"2-bit no rotation", Config{GroupSize: 64, Bits: 2}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			levels := map[string]bool{}
			for _, scale := range []float32{1.0 / 64, 1, 64} {
				f := kvCache(t, 2, 2, 32, 64, safetensors.F32, 7)
				for i := range f.Tensors {
					x := decode(t, &f.Tensors[i])
					for j := range x {
						x[j] *= scale
					}
					f.Tensors[i].Data = f32Bytes(x)
				}
				res, err := Compress(f, tc.cfg)
				if err != nil {
					t.Fatal(err)
				}
				levels[res.Quality.Level()] = true
			}
			if len(levels) != 1 {
				t.Errorf("levels across scales = %v, want one", levels)
			}
		})
	}
}

func TestStatsQuality(t *testing.T) {
	var st tensorStats
	x := []float32{1, 2, 3, 4}
	y := []float32{1, 2, 3, 5}
	var gs groupStats
	for i := range x {
		gs.add(x[i], y[i])
	}
	st.addGroup(&gs, len(x))
	q := st.quality()
	if want := 0.5; math.Abs(float64(q.RMSE)-want) > 1e-12 {
		t.Errorf("rmse %v, want %v", q.RMSE, want)
	}
	if want := 10 * math.Log10(30.0/1.0); math.Abs(float64(q.SNRdB)-want) > 1e-9 {
		t.Errorf("snr %v, want %v", q.SNRdB, want)
	}
	if want := 34 / (math.Sqrt(30) * math.Sqrt(39)); math.Abs(float64(q.CosineSimilarity)-want) > 1e-12 {
		t.Errorf("cos %v, want %v", q.CosineSimilarity, want)
	}
	if q.MaxError != 1 {
		t.Errorf("max error %v", q.MaxError)
	}
}

// TestQuantizePairMatchesDivision checks the multiply-by-reciprocal fast path
// against the defining division on values crafted to sit on and near ties.
func TestQuantizePairMatchesDivision(t *testing.T) {
	scales := []float32{1, f16(0.1), f16(1.0 / 7), f16(3.3), safetensors.F16ToF32(0x0001), safetensors.F16ToF32(0x03ff), 65504.0 / 7}
	for _, s := range scales {
		inv := 1 / s
		for k := -17; k <= 17; k++ {
			base := float32(k) / 2 * s // exact ties and integers
			for _, v := range []float32{base, math.Nextafter32(base, 1e9), math.Nextafter32(base, -1e9)} {
				a, b := quantizePair(v, -v, s, inv)
				if a != quantizeCode(v, s) || b != quantizeCode(-v, s) {
					t.Fatalf("s=%g v=%g: fast (%d, %d), division (%d, %d)", s, v, a, b, quantizeCode(v, s), quantizeCode(-v, s))
				}
			}
		}
	}
	rng := rand.New(rand.NewPCG(8, 8))
	for range 1_000_000 {
		s := safetensors.F16ToF32(uint16(1 + rng.IntN(0x7bff)))
		v := float32((rng.Float64()*16 - 8)) * s
		a, _ := quantizePair(v, 0, s, 1/s)
		if a != quantizeCode(v, s) {
			t.Fatalf("s=%g v=%g: fast %d, division %d", s, v, a, quantizeCode(v, s))
		}
	}
}

// TestDequantTableFastPath compares the table's shortcut with converting every
// code, saturated to the dtype's largest finite value (format.md, section 3).
func TestDequantTableFastPath(t *testing.T) {
	for _, dt := range []safetensors.DType{safetensors.F16, safetensors.BF16, safetensors.F32} {
		for h := 0; h < 0x7c00; h++ {
			s := safetensors.F16ToF32(uint16(h))
			var lut [16]float32
			dequantTable(&lut, s, dt)
			for c := range 16 {
				want := safetensors.RoundTo(dt, saturate(dt, float32(int8(c<<4)>>4)*s))
				if math.IsInf(float64(want), 0) {
					t.Fatalf("%s scale %#04x code %d reconstructs to %v", dt, h, c, want)
				}
				if lut[c] != want {
					t.Fatalf("%s scale %#04x code %d: %v, want %v", dt, h, c, lut[c], want)
				}
			}
		}
	}
}

func TestEncodePayloadChoosesEncoding(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 3))
	random := make([]byte, 8*probeBytes)
	for i := range random {
		random[i] = byte(rng.Uint32())
	}
	tests := []struct {
		name string
		raw  []byte
		want string
	}{
		{"zeros", make([]byte, 8*probeBytes), EncodingLZ4},
		{"random", random, EncodingStored},
		{"small random", random[:1000], EncodingStored},
		{"empty", nil, EncodingStored},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var e lz4Encoder
			data, enc := e.encode(tc.raw)
			if enc != tc.want {
				t.Fatalf("encoding %s, want %s", enc, tc.want)
			}
			back := make([]byte, len(tc.raw))
			if err := decodePayload(data, enc, back); err != nil || !bytes.Equal(back, tc.raw) {
				t.Fatalf("round trip: %v", err)
			}
		})
	}
}
