package compression

import (
	"bytes"
	"errors"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// TestNFTablesAreLloydMax checks the written tables: 2^b ascending levels,
// symmetric, outer levels ±1, thresholds the float32 midpoints of their
// neighbours, and every level the centroid of its cell under N(0, 1) once
// scaled back by the outer Lloyd-Max level (the defining property).
func TestNFTablesAreLloydMax(t *testing.T) {
	outer := map[int]float64{2: 1.5104176085, 3: 2.1519457045, 4: 2.7325895710}
	phi := func(x float64) float64 { return math.Exp(-x*x/2) / math.Sqrt(2*math.Pi) }
	cdf := func(x float64) float64 { return 0.5 * (1 + math.Erf(x/math.Sqrt2)) }
	for _, bits := range NFBitWidths {
		tab := nfTables[bits]
		n := 1 << bits
		if len(tab.levels) != n || len(tab.thresholds) != n-1 {
			t.Fatalf("%d bits: %d levels, %d thresholds", bits, len(tab.levels), len(tab.thresholds))
		}
		if tab.levels[0] != -1 || tab.levels[n-1] != 1 {
			t.Errorf("%d bits: outer levels %g, %g", bits, tab.levels[0], tab.levels[n-1])
		}
		for i := range n {
			if tab.levels[i] != -tab.levels[n-1-i] || (i > 0 && tab.levels[i] <= tab.levels[i-1]) {
				t.Errorf("%d bits: level %d (%g) breaks symmetry or order", bits, i, tab.levels[i])
			}
		}
		for i, th := range tab.thresholds {
			if want := float32((float64(tab.levels[i]) + float64(tab.levels[i+1])) / 2); th != want {
				t.Errorf("%d bits: threshold %d is %g, midpoint %g", bits, i, th, want)
			}
		}
		for i, l := range tab.levels {
			a, b := math.Inf(-1), math.Inf(1)
			if i > 0 {
				a = float64(tab.thresholds[i-1]) * outer[bits]
			}
			if i < n-1 {
				b = float64(tab.thresholds[i]) * outer[bits]
			}
			centroid := (phi(a) - phi(b)) / (cdf(b) - cdf(a)) / outer[bits]
			if math.Abs(centroid-float64(l)) > 2e-6 {
				t.Errorf("%d bits: level %d is %.9g, the centroid of its cell %.9g", bits, i, l, centroid)
			}
		}
	}
}

func TestNFCodeRule(t *testing.T) {
	thr := nfTables[3].thresholds
	for _, c := range []struct {
		name string
		t    float32
		want int32
	}{
		{"far below", -5, 0},
		{"on the lowest threshold: lower level", thr[0], 0},
		{"just above it", math.Nextafter32(thr[0], 1), 1},
		{"zero: lower level", 0, 3},
		{"negative zero", float32(math.Copysign(0, -1)), 3},
		{"smallest positive", math.SmallestNonzeroFloat32, 4},
		{"one", 1, 7},
		{"above one", 1.001, 7},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := nfCode(thr, c.t); got != c.want {
				t.Errorf("nfCode(%g) = %d, want %d", c.t, got, c.want)
			}
		})
	}
}

// nfExpect is the written rule for one group, computed plainly: the scale,
// and each element's code (a linear count of the thresholds below v/scale)
// and reconstruction.
func nfExpect(v []float32, bits int) (uint16, []int32, []float32) {
	tab := nfTables[bits]
	var m float32
	for _, x := range v {
		m = max(m, float32(math.Abs(float64(x))))
	}
	s16 := safetensors.F32ToF16(m)
	s := safetensors.F16ToF32(s16)
	codes, recon := make([]int32, len(v)), make([]float32, len(v))
	for i, x := range v {
		t := float32(0)
		if s != 0 {
			t = x / s
		}
		for _, th := range tab.thresholds {
			if th < t {
				codes[i]++
			}
		}
		recon[i] = tab.levels[codes[i]] * s
		if recon[i] == 0 {
			recon[i] = 0 // +0
		}
	}
	return s16, codes, recon
}

// TestNFMatchesTheRule compresses with the nf scheme (no rotation, groups
// along the last axis, no sink) and checks the scales, codes and restored
// values against nfExpect, for each width and dtype.
func TestNFMatchesTheRule(t *testing.T) {
	for _, bits := range NFBitWidths {
		// Not BF16: rowsTestFile's largest values round to 65536 there, past
		// float16's range, which a scale equal to the magnitude cannot hold
		// (TestNFScaleOverflow).
		for _, dt := range []safetensors.DType{safetensors.F16, safetensors.F32} {
			t.Run(modeName(bits)+"/"+string(dt), func(t *testing.T) {
				f := rowsTestFile(t, dt, 9, 64)
				cfg := Config{GroupSize: 32, Scheme: SchemeNF, Bits: bits, Entropy: EntropyNone}
				res, err := Compress(f, cfg)
				if err != nil {
					t.Fatal(err)
				}
				container := asContainer(t, res)
				restored, err := Decompress(container, 1)
				if err != nil {
					t.Fatal(err)
				}
				idx, err := ReadIndex(container)
				if err != nil {
					t.Fatal(err)
				}
				for i, e := range idx.Entries {
					if e.Scheme != SchemeNF || e.Mode != modeName(bits) {
						t.Fatalf("%s: scheme %q mode %q", e.Name, e.Scheme, e.Mode)
					}
					x := decode(t, &f.Tensors[i])
					y := decode(t, &restored.Tensors[i])
					codes, scales := make([]byte, e.Codes.RawBytes), make([]byte, e.Scales.RawBytes)
					if err := readPayload(memorySource(container), e.Codes, codes, nil); err != nil {
						t.Fatal(err)
					}
					if err := readPayload(memorySource(container), e.Scales, scales, nil); err != nil {
						t.Fatal(err)
					}
					br := bitReader{in: codes}
					for g := 0; g < len(x)/32; g++ {
						s16, want, recon := nfExpect(x[g*32:(g+1)*32], bits)
						if got := uint16(scales[2*g]) | uint16(scales[2*g+1])<<8; got != s16 {
							t.Fatalf("%s group %d: scale %#04x, want %#04x", e.Name, g, got, s16)
						}
						for j := range want {
							if got := int32(br.get(uint(bits))); got != want[j] {
								t.Fatalf("%s element %d: code %d, want %d", e.Name, g*32+j, got, want[j])
							}
							r := safetensors.RoundTo(dt, saturate(dt, recon[j]))
							if math.Float32bits(y[g*32+j]) != math.Float32bits(r) {
								t.Fatalf("%s element %d: restored %g, want %g", e.Name, g*32+j, y[g*32+j], r)
							}
						}
					}
				}
			})
		}
	}
}

// TestNFRoundTripsEveryLayout runs nf through rotations, per-channel keys
// and sinks, and checks the error it reports is what a Gaussian quantizer
// of that width gives (the outer level at the group's largest magnitude
// costs 2 bits the most: about 7 dB against 9.3 for a Gaussian's own
// scale), and that nf beats sym at 3 and 4 bits on rotated Gaussian data.
func TestNFRoundTripsEveryLayout(t *testing.T) {
	minSNR := map[int]float64{2: 6, 3: 13.5, 4: 19}
	for _, bits := range NFBitWidths {
		for _, c := range []struct {
			name string
			cfg  Config
		}{
			{"hadamard-G64", Config{GroupSize: 64, Rotate: RotateHadamard}},
			{"channel-keys-sink1", Config{GroupSize: 64, Rotate: RotateHadamard, KeyAxis: KeyAxisChannel, Sink: 1}},
			{"G32-sink2-exact", Config{GroupSize: 32, Rotate: RotateHadamard, Sink: 2, ExactMetrics: true}},
		} {
			t.Run(modeName(bits)+"/"+c.name, func(t *testing.T) {
				f := kvCache(t, 2, 2, 40, 64, safetensors.F32, 5)
				cfg := c.cfg
				cfg.Scheme, cfg.Bits = SchemeNF, bits
				res, err := Compress(f, cfg)
				if err != nil {
					t.Fatal(err)
				}
				restored, err := Decompress(asContainer(t, res), 1)
				if err != nil {
					t.Fatal(err)
				}
				cfg.Scheme = SchemeSym
				sym, err := Compress(f, cfg)
				if err != nil {
					t.Fatal(err)
				}
				for i, r := range res.PerTensor {
					x, y := decode(t, &f.Tensors[i]), decode(t, &restored.Tensors[i])
					var num, den float64
					for j := range x {
						num += float64(x[j]-y[j]) * float64(x[j]-y[j])
						den += float64(x[j]) * float64(x[j])
					}
					snr := 10 * math.Log10(den/num)
					if snr < minSNR[bits] || math.Abs(snr-float64(r.SNRdB)) > 0.01 {
						t.Errorf("%s: SNR %.2f dB restored, %.2f reported (want >= %g)", r.Name, snr, float64(r.SNRdB), minSNR[bits])
					}
					if bits >= 3 && r.SNRdB <= sym.PerTensor[i].SNRdB {
						t.Errorf("%s: nf %.2f dB, sym %.2f dB", r.Name, float64(r.SNRdB), float64(sym.PerTensor[i].SNRdB))
					}
				}
			})
		}
	}
}

// TestStepsMatchVectorEncoder checks that plans with steps write the same
// bytes through the vector encoders as through the scalar ones.
func TestStepsMatchVectorEncoder(t *testing.T) {
	for _, c := range []struct {
		name  string
		roles RolePlans
	}{
		{"sym4-steps4-values", RolePlans{Values: &RolePlan{Steps: 4}}},
		{"sym4-steps3.5", RolePlans{Keys: &RolePlan{Steps: 3.5}, Values: &RolePlan{Steps: 3.5}}},
		{"asym4-steps9-channel-keys", RolePlans{Keys: &RolePlan{Scheme: SchemeAsym, Steps: 9, GroupSize: 128, Axis: KeyAxisChannel}}},
		{"sym3-steps2", RolePlans{Values: &RolePlan{Bits: 3, Steps: 2}}},
	} {
		for _, dt := range []safetensors.DType{safetensors.F16, safetensors.F32} {
			t.Run(c.name+"/"+string(dt), func(t *testing.T) {
				f := rowsTestFile(t, dt, 37, 64)
				cfg := DefaultConfig()
				cfg.Roles = &c.roles
				vec, scalar, vecErr, scalarErr := compressBoth(t, f, cfg)
				if vecErr != nil || scalarErr != nil {
					t.Fatalf("vector %v, scalar %v", vecErr, scalarErr)
				}
				assertSameAsScalar(t, vec, scalar)
			})
		}
	}
}

// TestStepsLetTheEntropyStageDecide: symmetric 4-bit codes with 3 steps
// reconstruct exactly what 3-bit codes do (the same scale, the same codes),
// but in nibbles the entropy stage reads well, so they take less room.
func TestStepsLetTheEntropyStageDecide(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	vals := make([]float32, 4*256*64)
	for i := range vals {
		vals[i] = float32(rng.NormFloat64())
	}
	f := &safetensors.File{Tensors: []safetensors.Tensor{{Name: "layer_0_value", DType: safetensors.F16, Shape: []int64{1, 4, 256, 64}, Data: f16Bytes(vals)}}}
	three := DefaultConfig()
	three.Bits = 3
	steps := DefaultConfig()
	steps.Roles = &RolePlans{Values: &RolePlan{Steps: 3}}
	a, err := Compress(f, three)
	if err != nil {
		t.Fatal(err)
	}
	b, err := Compress(f, steps)
	if err != nil {
		t.Fatal(err)
	}
	ra, err := Decompress(asContainer(t, a), 1)
	if err != nil {
		t.Fatal(err)
	}
	rb, err := Decompress(asContainer(t, b), 1)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(ra.Tensors[0].Data, rb.Tensors[0].Data) {
		t.Fatal("4-bit codes with 3 steps restore other values than 3-bit codes")
	}
	codes := func(r *Result) int {
		for _, p := range r.Tensors {
			if p.Name == "layer_0_value"+SuffixCodes {
				return len(p.Data)
			}
		}
		t.Fatal("no codes payload")
		return 0
	}
	if ca, cb := codes(a), codes(b); cb >= ca {
		t.Errorf("codes take %d bytes with 3 steps in 4 bits, %d as 3-bit codes", cb, ca)
	}
}

func TestNFAndStepsValidation(t *testing.T) {
	f := kvCache(t, 1, 1, 8, 64, safetensors.F16, 1)
	for _, c := range []struct {
		name string
		cfg  Config
		ok   bool
	}{
		{"nf 3-bit", Config{GroupSize: 64, Scheme: SchemeNF, Bits: 3}, true},
		{"nf 8-bit", Config{GroupSize: 64, Scheme: SchemeNF, Bits: 8}, false},
		{"nf with 8-bit keys", Config{GroupSize: 64, Scheme: SchemeNF, KeyBits: 8}, false},
		{"role nf 8-bit", Config{GroupSize: 64, Roles: &RolePlans{Keys: &RolePlan{Scheme: SchemeNF, Bits: 8}}}, false},
		{"role nf under global 8-bit", Config{GroupSize: 64, Bits: 8, Roles: &RolePlans{Keys: &RolePlan{Scheme: SchemeNF}}}, false},
		{"role nf with steps", Config{GroupSize: 64, Roles: &RolePlans{Values: &RolePlan{Scheme: SchemeNF, Steps: 3}}}, false},
		{"steps inherited by nf", Config{GroupSize: 64, Roles: &RolePlans{Values: &RolePlan{Steps: 3},
			Layers: []LayerPlan{{Layers: []int{0}, Values: &RolePlan{Scheme: SchemeNF}}}}}, false},
		{"steps 7 sym 4-bit", Config{GroupSize: 64, Roles: &RolePlans{Values: &RolePlan{Steps: 7}}}, true},
		{"steps 8 sym 4-bit", Config{GroupSize: 64, Roles: &RolePlans{Values: &RolePlan{Steps: 8}}}, false},
		{"steps 15 asym 4-bit", Config{GroupSize: 64, Roles: &RolePlans{Values: &RolePlan{Scheme: SchemeAsym, Steps: 15}}}, true},
		{"steps 0.5", Config{GroupSize: 64, Roles: &RolePlans{Values: &RolePlan{Steps: 0.5}}}, false},
		{"steps NaN", Config{GroupSize: 64, Roles: &RolePlans{Values: &RolePlan{Steps: math.NaN()}}}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := Compress(f, c.cfg)
			if c.ok && err != nil {
				t.Fatal(err)
			}
			if !c.ok && !errors.Is(err, ErrConfig) {
				t.Fatalf("got %v, want ErrConfig", err)
			}
		})
	}
}

// TestNFScaleOverflow: the nf scale is the group's largest magnitude in
// float16, so a magnitude past 65504 (possible in bfloat16 and float32) is
// refused, as an asym minimum would be.
func TestNFScaleOverflow(t *testing.T) {
	vals := make([]float32, 64)
	vals[3] = 70000
	f := &safetensors.File{Tensors: []safetensors.Tensor{{Name: "x", DType: safetensors.F32, Shape: []int64{1, 64}, Data: f32Bytes(vals)}}}
	if _, err := Compress(f, Config{GroupSize: 64, Scheme: SchemeNF, Bits: 3}); !errors.Is(err, ErrScaleOverflow) {
		t.Fatalf("got %v, want ErrScaleOverflow", err)
	}
}

// goldenConfigsNF lists the golden cases of the nf scheme and of steps
// (testdata/golden/golden_nf.json, format 2): every nf width, both group
// axes, rotations and sinks, and steps in sym and asym role plans.
func goldenConfigsNF() []GoldenCase {
	return []GoldenCase{
		{Input: "long_f16.safetensors", GroupSize: 64, Scheme: SchemeNF, Bits: 3, Rotate: RotateHadamard, Sink: 1},
		{Input: "cache_bf16.safetensors", GroupSize: 32, Scheme: SchemeNF, Bits: 4},
		{Input: "cache_f32.safetensors", GroupSize: 64, Scheme: SchemeNF, Bits: 2, Rotate: RotateHadamard, KeyAxis: KeyAxisChannel, Sink: 1},
		{Input: "long_f16.safetensors", GroupSize: 64, Bits: 3, Rotate: RotateHadamard, KeyAxis: KeyAxisChannel, Sink: 1,
			Roles: &RolePlans{Keys: &RolePlan{Scheme: SchemeAsym, Rotate: RotateNone, Axis: KeyAxisChannel, GroupSize: 128, Bits: 4, Steps: 7},
				Values: &RolePlan{Bits: 4, Steps: 4}}},
		{Input: "long_f16.safetensors", GroupSize: 64, Rotate: RotateHadamard, KeyAxis: KeyAxisChannel, Sink: 1,
			Roles: &RolePlans{Keys: &RolePlan{Scheme: SchemeAsym, Rotate: RotateNone, Axis: KeyAxisChannel, GroupSize: 256, Steps: 9.5},
				Values: &RolePlan{Scheme: SchemeNF, Bits: 3}}},
		{Input: "cache_f16.safetensors", GroupSize: 128, Rotate: RotateHadamard,
			Roles: &RolePlans{Layers: []LayerPlan{{Layers: []int{0}, Keys: &RolePlan{Steps: 3.7}, Values: &RolePlan{Scheme: SchemeNF, Bits: 2}}}}},
	}
}

// BenchmarkNF compares the nf scheme (scalar code) and plans with steps
// (vector encoders) with the plans they replace, on the 2,048-token bench
// cache: compress and decompress, in-library.
func BenchmarkNF(b *testing.B) {
	compact := presetConfig(PresetCompact)
	vnf3 := presetConfig(PresetCompact)
	vnf3.Roles = &RolePlans{Keys: compact.Roles.Keys, Values: &RolePlan{Scheme: SchemeNF, Bits: 3}}
	vnf4 := DefaultConfig()
	vnf4.Roles = &RolePlans{Values: &RolePlan{Scheme: SchemeNF, Bits: 4}}
	kasym := DefaultConfig() // docs/experiments/presets/default-kasym-v4steps6.json
	kasym.Roles = &RolePlans{Keys: &RolePlan{Scheme: SchemeAsym, Rotate: RotateNone, Axis: KeyAxisChannel, GroupSize: 128},
		Values: &RolePlan{Steps: 6}}
	for _, c := range []struct {
		name string
		cfg  Config
	}{{"default", DefaultConfig()}, {"default-vnf4", vnf4}, {"default-kasym-v4steps6", kasym}, {"compact", compact}, {"compact-vnf3", vnf3}} {
		b.Run("compress/"+c.name, func(b *testing.B) {
			src := benchCache(b, 64)
			b.SetBytes(inputBytes(src))
			start := cpuSeconds()
			for b.Loop() {
				if _, err := Compress(src, c.cfg); err != nil {
					b.Fatal(err)
				}
			}
			reportCPU(b, start, inputBytes(src))
		})
		b.Run("decompress/"+c.name, func(b *testing.B) { benchDecompress(b, benchCache(b, 64), c.cfg) })
	}
}
