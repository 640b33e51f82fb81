package compression

import (
	"bytes"
	"errors"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// rowsTestFile builds one [2, 3, seq, dim] tensor per kind of hard input the
// row encoder must treat exactly as the scalar encoders do.
func rowsTestFile(tb testing.TB, dt safetensors.DType, seq, dim int) *safetensors.File {
	tb.Helper()
	rng := rand.New(rand.NewPCG(7, uint64(dim)))
	n := 2 * 3 * seq * dim
	kinds := []struct {
		name string
		gen  func(i int) float64
	}{
		// Gaussian with outlier channels, like real keys.
		{"layer_0_key", func(i int) float64 {
			v := rng.NormFloat64()
			if i%dim < 2 {
				v *= 12
			}
			return v
		}},
		// Half-integers and integers: with max 7 the scale is 1 and every
		// odd half-integer is a rounding tie (half to even).
		{"layer_0_value", func(i int) float64 {
			if i%8 == 0 {
				return 7
			}
			return float64(rng.IntN(30)-15) / 2
		}},
		// Magnitudes around float16's subnormal range: subnormal scales,
		// quotients that need clamping, groups whose scale rounds to zero.
		{"layer_1_key", func(i int) float64 {
			return rng.NormFloat64() * math.Ldexp(1, -14-rng.IntN(14))
		}},
		// Whole groups of zeros, signed zeros and a few spikes.
		{"layer_1_value", func(i int) float64 {
			switch {
			case (i/dim)%3 == 0:
				return 0
			case i%5 == 0:
				return math.Copysign(0, -1)
			case i%97 == 0:
				return 300 * rng.NormFloat64()
			}
			return rng.NormFloat64() / 64
		}},
		// Near float16's largest value: reconstructions may reach 65504, where
		// the vector rounding declines and the scalar path takes over.
		{"other_big", func(i int) float64 { return 65504 * (2*rng.Float64() - 1) }},
	}
	f := &safetensors.File{}
	vals := make([]float32, n)
	for _, k := range kinds {
		for i := range vals {
			vals[i] = float32(k.gen(i))
		}
		data := make([]byte, n*dt.Bits()/8)
		if err := safetensors.EncodeFloat32(dt, vals, data); err != nil {
			tb.Fatal(err)
		}
		f.Tensors = append(f.Tensors, safetensors.Tensor{Name: k.name, DType: dt, Shape: []int64{2, 3, int64(seq), int64(dim)}, Data: data})
	}
	return f
}

// compressBoth compresses f with the vector encoder and with the scalar paths.
func compressBoth(t *testing.T, f *safetensors.File, cfg Config) (vec, scalar *Result, vecErr, scalarErr error) {
	t.Helper()
	defer func(old bool) { simdEnabled = old }(simdEnabled)
	simdEnabled = haveSIMD
	vec, vecErr = Compress(f, cfg)
	simdEnabled = false
	scalar, scalarErr = Compress(f, cfg)
	return
}

// decompressBoth writes res as a container and restores it with the vector
// decoder and with the scalar one.
func decompressBoth(t *testing.T, res *Result) (vec, scalar *Restored) {
	t.Helper()
	container := asContainer(t, res)
	defer func(old bool) { simdEnabled = old }(simdEnabled)
	simdEnabled = haveSIMD
	var err error
	if vec, err = Decompress(container, 1); err != nil {
		t.Fatal(err)
	}
	simdEnabled = false
	if scalar, err = Decompress(container, 1); err != nil {
		t.Fatal(err)
	}
	return vec, scalar
}

// TestRowEncoderMatchesScalar checks that the vector row encoder writes the
// same payload bytes as the scalar encoders and measures the same error, and
// that the vector row decoder restores the same bytes as the scalar one, for
// every dtype, group size, rotation and sink it handles. Without SIMD in the
// build both runs take the scalar path and the test only checks determinism.
func TestRowEncoderMatchesScalar(t *testing.T) {
	if !haveSIMD {
		t.Log("built without GOEXPERIMENT=simd (or no AVX2): comparing the scalar path with itself")
	}
	for _, dt := range []safetensors.DType{safetensors.F16, safetensors.BF16, safetensors.F32} {
		for _, dim := range []int{8, 24, 64, 128} {
			for _, c := range []struct {
				name string
				cfg  Config
			}{
				{"seed-G32", Config{GroupSize: 32}},
				{"seed-G64", Config{GroupSize: 64}},
				{"seed-G128", Config{GroupSize: 128}},
				{"default", DefaultConfig()},
				{"hadamard-G32-sink3", Config{GroupSize: 32, Rotate: RotateHadamard, Sink: 3}},
				{"hadamard-G128", Config{GroupSize: 128, Rotate: RotateHadamard}},
				{"sym-sink2", Config{GroupSize: 64, Sink: 2}},
				{"channel-keys-default", Config{GroupSize: 64, Rotate: RotateHadamard, KeyAxis: KeyAxisChannel, Sink: 1}},
				{"channel-keys-G32", Config{GroupSize: 32, KeyAxis: KeyAxisChannel}},
				{"channel-keys-G128-sink3", Config{GroupSize: 128, Rotate: RotateHadamard, KeyAxis: KeyAxisChannel, Sink: 3}},
				{"default-exact-metrics", Config{GroupSize: 64, Rotate: RotateHadamard, KeyAxis: KeyAxisChannel, Sink: 1, ExactMetrics: true}},
				{"asym-G64", Config{GroupSize: 64, Scheme: SchemeAsym}},
				{"asym-hadamard-G32-sink3", Config{GroupSize: 32, Scheme: SchemeAsym, Rotate: RotateHadamard, Sink: 3}},
				{"asym-hadamard-G64-exact", Config{GroupSize: 64, Scheme: SchemeAsym, Rotate: RotateHadamard, ExactMetrics: true}},
				{"asym-channel-keys-default", Config{GroupSize: 64, Scheme: SchemeAsym, Rotate: RotateHadamard, KeyAxis: KeyAxisChannel, Sink: 1}},
				{"asym-channel-keys-G32", Config{GroupSize: 32, Scheme: SchemeAsym, KeyAxis: KeyAxisChannel}},
				{"b3-G64", Config{GroupSize: 64, Bits: 3}},
				{"b3-hadamard-G128-sink2", Config{GroupSize: 128, Bits: 3, Rotate: RotateHadamard, Sink: 2}},
				{"b3-asym-channel-keys-default", Config{GroupSize: 64, Bits: 3, Scheme: SchemeAsym, Rotate: RotateHadamard, KeyAxis: KeyAxisChannel, Sink: 1}},
				{"b3-channel-keys-G32-exact", Config{GroupSize: 32, Bits: 3, Rotate: RotateHadamard, KeyAxis: KeyAxisChannel, ExactMetrics: true}},
				{"b2-G32", Config{GroupSize: 32, Bits: 2}},
				{"b2-asym-hadamard-G64", Config{GroupSize: 64, Bits: 2, Scheme: SchemeAsym, Rotate: RotateHadamard}},
				{"b2-channel-keys-default", Config{GroupSize: 64, Bits: 2, Rotate: RotateHadamard, KeyAxis: KeyAxisChannel, Sink: 1}},
				{"b2-asym-channel-keys-G128-sink3", Config{GroupSize: 128, Bits: 2, Scheme: SchemeAsym, KeyAxis: KeyAxisChannel, Sink: 3}},
				{"keys-b2-values-b3-asym", Config{GroupSize: 32, KeyBits: 2, ValueBits: 3, Scheme: SchemeAsym, Rotate: RotateHadamard}},
				{"b8-hadamard-scalar", Config{GroupSize: 64, Bits: 8, Rotate: RotateHadamard}},
			} {
				if dim%c.cfg.GroupSize != 0 {
					continue
				}
				t.Run(string(dt)+"/dim"+itoa(dim)+"/"+c.name, func(t *testing.T) {
					f := rowsTestFile(t, dt, 37, dim)
					vec, scalar, vecErr, scalarErr := compressBoth(t, f, c.cfg)
					if (vecErr == nil) != (scalarErr == nil) || (vecErr != nil && vecErr.Error() != scalarErr.Error()) {
						t.Fatalf("errors differ: vector %v, scalar %v", vecErr, scalarErr)
					}
					if vecErr != nil {
						return
					}
					assertSameAsScalar(t, vec, scalar)
					for i, r := range vec.PerTensor {
						s := scalar.PerTensor[i]
						for _, q := range [][2]Metric{{r.RMSE, s.RMSE}, {r.SNRdB, s.SNRdB}, {r.CosineSimilarity, s.CosineSimilarity}} {
							if !near(q[0], q[1]) && !sameSpecial(q[0], q[1]) {
								t.Errorf("%s: quality %+v, scalar %+v", r.Name, r.Quality, s.Quality)
								break
							}
						}
						if r.MaxError != s.MaxError {
							t.Errorf("%s: max error %g, scalar %g", r.Name, r.MaxError, s.MaxError)
						}
					}
				})
			}
		}
	}
}

// TestRowEncoderRefusesWhatScalarRefuses feeds non-finite values and scales
// that overflow float16, and expects the scalar path's exact error.
func TestRowEncoderRefusesWhatScalarRefuses(t *testing.T) {
	for _, c := range []struct {
		name string
		dt   safetensors.DType
		at   int
		v    float32
		cfg  Config
	}{
		{"nan-f16", safetensors.F16, 77, float32(math.NaN()), Config{GroupSize: 64}},
		{"inf-bf16-default", safetensors.BF16, 5, float32(math.Inf(-1)), DefaultConfig()},
		{"inf-in-sink", safetensors.F32, 3, float32(math.Inf(1)), DefaultConfig()},
		{"scale-overflow-f32", safetensors.F32, 100, 1e6, Config{GroupSize: 32}},
		{"scale-overflow-rotated", safetensors.F32, 300, 1e7, DefaultConfig()},
		{"rotation-overflow", safetensors.F32, -1, -1.7e38, DefaultConfig()},
		{"rotation-overflow-asym", safetensors.F32, -1, -1.7e38, Config{GroupSize: 64, Scheme: SchemeAsym, Rotate: RotateHadamard}},
	} {
		t.Run(c.name, func(t *testing.T) {
			vals := make([]float32, 4*16*64)
			for i := range vals {
				vals[i] = float32(i%13) / 13
			}
			if c.at >= 0 {
				vals[c.at] = c.v
			} else { // a whole row of huge values, past the first (sink) position
				for i := 64; i < 64+49; i++ {
					vals[i] = c.v
				}
			}
			data := make([]byte, len(vals)*c.dt.Bits()/8)
			if err := safetensors.EncodeFloat32(c.dt, vals, data); err != nil {
				t.Fatal(err)
			}
			f := &safetensors.File{Tensors: []safetensors.Tensor{{Name: "layer_0_key", DType: c.dt, Shape: []int64{1, 4, 16, 64}, Data: data}}}
			_, _, vecErr, scalarErr := compressBoth(t, f, c.cfg)
			if vecErr == nil || scalarErr == nil || vecErr.Error() != scalarErr.Error() {
				t.Fatalf("vector error %v, scalar error %v: want the same error", vecErr, scalarErr)
			}
			if want := map[bool]error{true: ErrNonFinite, false: ErrScaleOverflow}[c.v != c.v || math.IsInf(float64(c.v), 0)]; !errors.Is(vecErr, want) {
				t.Fatalf("error %v, want %v", vecErr, want)
			}
		})
	}
}

// sameSpecial reports whether a and b are both NaN or the same infinity.
func sameSpecial(x, y Metric) bool {
	a, b := float64(x), float64(y)
	return (math.IsNaN(a) && math.IsNaN(b)) || (math.IsInf(a, 0) && a == b)
}

// FuzzRowEncoder feeds arbitrary bit patterns (NaN, Inf, subnormals, huge
// values included) to both encoders: the vector row encoder must write the
// scalar encoders' bytes, and fail exactly when and how they fail.
func FuzzRowEncoder(f *testing.F) {
	seed := rowsTestFile(f, safetensors.F16, 3, 64)
	for i, t := range seed.Tensors {
		f.Add(uint8(i), t.Data[:512])
	}
	f.Add(uint8(9), bytes.Repeat([]byte{0x00, 0x7c}, 64))             // +Inf in float16
	f.Add(uint8(3), bytes.Repeat([]byte{0x01, 0x00, 0x00, 0x00}, 64)) // float32 subnormals
	dtypes := []safetensors.DType{safetensors.F16, safetensors.BF16, safetensors.F32}
	configs := []Config{
		{GroupSize: 32}, {GroupSize: 64}, DefaultConfig(),
		{GroupSize: 32, Rotate: RotateHadamard, Sink: 1}, {GroupSize: 64, Sink: 2},
		{GroupSize: 64, Rotate: RotateHadamard, KeyAxis: KeyAxisChannel, Sink: 1}, {GroupSize: 32, KeyAxis: KeyAxisChannel},
		// Asymmetric, 3-bit and 2-bit codes, along either axis, rotated or
		// not, measured in either basis.
		{GroupSize: 32, Scheme: SchemeAsym}, {GroupSize: 64, Scheme: SchemeAsym, Rotate: RotateHadamard, KeyAxis: KeyAxisChannel, Sink: 1},
		{GroupSize: 32, Bits: 3, Rotate: RotateHadamard}, {GroupSize: 32, Bits: 3, Scheme: SchemeAsym, KeyAxis: KeyAxisChannel},
		{GroupSize: 32, Bits: 2, Sink: 1}, {GroupSize: 32, Bits: 2, Scheme: SchemeAsym, Rotate: RotateHadamard, KeyAxis: KeyAxisChannel, ExactMetrics: true},
		{GroupSize: 32, Bits: 3, Rotate: RotateHadamard, KeyAxis: KeyAxisChannel, Sink: 1},
	}
	dims := []int{8, 16, 32, 64}
	f.Fuzz(func(t *testing.T, sel uint8, data []byte) {
		dt := dtypes[int(sel)%len(dtypes)]
		cfg := configs[int(sel/3)%len(configs)]
		dim := max(dims[int(sel/45)%len(dims)], cfg.GroupSize)
		width := dt.Bits() / 8
		rows := len(data) / (dim * width)
		if rows == 0 {
			return
		}
		tensor := safetensors.Tensor{Name: "layer_0_key", DType: dt, Shape: []int64{1, int64(rows), int64(dim)}, Data: data[:rows*dim*width]}
		vec, scalar, vecErr, scalarErr := compressBoth(t, &safetensors.File{Tensors: []safetensors.Tensor{tensor}}, cfg)
		if (vecErr == nil) != (scalarErr == nil) || (vecErr != nil && vecErr.Error() != scalarErr.Error()) {
			t.Fatalf("errors differ: vector %v, scalar %v", vecErr, scalarErr)
		}
		if vecErr != nil {
			return
		}
		for i := range vec.Tensors {
			if !bytes.Equal(vec.Tensors[i].Data, scalar.Tensors[i].Data) {
				t.Fatalf("payload %s differs from the scalar encoder's", vec.Tensors[i].Name)
			}
		}
		r, s := vec.PerTensor[0], scalar.PerTensor[0]
		if r.MaxError != s.MaxError && !sameSpecial(r.MaxError, s.MaxError) {
			t.Fatalf("max error %g, scalar %g", r.MaxError, s.MaxError)
		}
	})
}

// FuzzRowDecoder decodes arbitrary codes and scales (negative, Inf and NaN
// scales included) with both decoders: the restored bytes, or the error, must
// be the same.
func FuzzRowDecoder(f *testing.F) {
	f.Add(uint8(0), []byte{0x12, 0x34, 0x00, 0x3c, 0xff, 0x7b, 0x01, 0x00})
	f.Add(uint8(4), []byte{0x88, 0x77, 0x00, 0x7c})
	f.Add(uint8(7), []byte{0x01, 0x80, 0x00, 0x04})
	dtypes := []safetensors.DType{safetensors.F16, safetensors.BF16, safetensors.F32}
	f.Fuzz(func(t *testing.T, sel uint8, data []byte) {
		dt := dtypes[int(sel)%len(dtypes)]
		p := tensorPlan{Scheme: SchemeSym, Bits: 4, Axis: AxisLast, Rotate: RotateHadamard, Group: 32, Sink: int(sel/3) % 3}
		if sel&0x80 != 0 {
			p.Rotate = RotateNone
		}
		dim := 32 << (int(sel/9) % 3)
		rowBytes := dim/2 + 2*dim/p.Group // codes and scales of one row (about, per channel)
		rows := len(data) / rowBytes
		seq := rows + p.Sink
		if rows == 0 {
			return
		}
		name := "layer_0_value"
		if sel&0x40 != 0 { // per-channel keys: groups along the sequence
			p.Axis, name = AxisSeq, "layer_0_key"
		}
		e := &Entry{Name: name, DType: string(dt), Shape: []int64{1, int64(seq), int64(dim)}}
		nCodes, nScales, _, _ := p.payloadSizes(e.Shape, dt.Bits()/8)
		if int64(len(data)) < nCodes+nScales {
			return
		}
		codes := data[:nCodes]
		scales := data[nCodes : nCodes+nScales]
		assertDecodeMatchesScalar(t, e, p, codes, scales, nil, seq, dim, dt)
	})
}

// TestSignedZeroGroupsDecode: a group of zeros that starts with −0 once got
// the asymmetric scale −0, which every decoder refuses as corrupt. Each
// scheme must write scale +0 and restore the zeros.
func TestSignedZeroGroupsDecode(t *testing.T) {
	for _, cfg := range []Config{
		{GroupSize: 64, Scheme: SchemeAsym},
		{GroupSize: 32, Scheme: SchemeAsym, KeyAxis: KeyAxisChannel},
		{GroupSize: 64},
		DefaultConfig(),
	} {
		t.Run(cfg.scheme()+"-"+cfg.keyAxis()+"-"+cfg.rotate(), func(t *testing.T) {
			negZero := float32(math.Copysign(0, -1))
			vals := make([]float32, 2*64*64)
			for i := range vals {
				vals[i] = float32(i%7) - 3
				if i/64 == 5 || i%64 == 9 { // a zero row and a zero channel
					vals[i] = 0
					if i%2 == 0 {
						vals[i] = negZero
					}
				}
			}
			data := f32Bytes(vals)
			f := &safetensors.File{Tensors: []safetensors.Tensor{
				{Name: "layer_0_key", DType: safetensors.F32, Shape: []int64{1, 2, 64, 64}, Data: data},
				{Name: "layer_0_value", DType: safetensors.F32, Shape: []int64{1, 2, 64, 64}, Data: data},
			}}
			res, err := Compress(f, cfg)
			if err != nil {
				t.Fatal(err)
			}
			restored, err := Decompress(asContainer(t, res), 1)
			if err != nil {
				t.Fatalf("the container does not decode: %v", err)
			}
			for _, rt := range restored.Tensors {
				got := decode(t, &rt)
				for i := range 64 {
					// Groups run along the row, or along the channel for per-channel
					// keys, whose zero channel a rotation spreads over the others.
					at := 5*64 + i
					if rt.Name == "layer_0_key" && cfg.KeyAxis == KeyAxisChannel {
						if cfg.rotate() != RotateNone {
							break
						}
						at = i*64 + 9
					}
					if v := got[at]; v != 0 {
						t.Fatalf("%s: zero group restored as %g at element %d", rt.Name, v, at)
					}
				}
			}
		})
	}
}

// TestPackBits compares packBits with a bit-at-a-time reference for every
// start offset within a byte and lengths up to 100 bits, next to other data.
func TestPackBits(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	for at := range 16 {
		for n := range 100 {
			bits := make([]byte, n)
			for i := range bits {
				bits[i] = byte(rng.IntN(2))
			}
			src := make([]byte, (n+7)/8+1) // packed, zero-padded as the encoder leaves it
			for i, b := range bits {
				src[i/8] |= b << (i % 8)
			}
			want := make([]byte, (at+n+15)/8)
			if at > 0 { // a neighbour's bit just before ours
				want[(at-1)/8] |= 1 << ((at - 1) % 8)
			}
			got := append([]byte(nil), want...)
			for i, b := range bits {
				k := at + i
				want[k/8] |= b << (k % 8)
			}
			packBits(got, at, src, n)
			if !bytes.Equal(got, want) {
				t.Fatalf("at %d, n %d: got %x, want %x", at, n, got, want)
			}
		}
	}
}

// TestPackNibbles compares packNibbles with a nibble-at-a-time reference for
// every start parity and length up to 80 codes, next to other data.
func TestPackNibbles(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for at := range 4 {
		for n := range 80 {
			codes := make([]byte, n)
			for i := range codes {
				codes[i] = byte(rng.IntN(16))
			}
			src := make([]byte, (n+1)/2+8) // packed, zero-padded as the encoder leaves it
			for i, c := range codes {
				src[i/2] |= c << (4 * (i % 2))
			}
			want := make([]byte, (at+n+9)/2)
			if at > 0 { // a neighbour's code just before ours
				want[(at-1)/2] |= 0xf << (4 * ((at - 1) % 2))
			}
			got := append([]byte(nil), want...)
			for i, c := range codes {
				k := at + i
				want[k/2] |= c << (4 * (k % 2))
			}
			packNibbles(got, at, src, n)
			if !bytes.Equal(got, want) {
				t.Fatalf("at %d, n %d: got %x, want %x", at, n, got, want)
			}
		}
	}
}

// TestVectorEncoderTakesEveryWidth checks that the vector encoders do take
// (and do not silently decline) the asymmetric scheme and 2- and 3-bit codes
// along both axes, rotated or not, on ordinary data: a decline would leave
// the bytes right and the speed gone.
func TestVectorEncoderTakesEveryWidth(t *testing.T) {
	src := kvCache(t, 1, 2, 40, 64, safetensors.F16, 3)
	for _, scheme := range []string{SchemeSym, SchemeAsym} {
		for _, bits := range []int{2, 3, 4} {
			for _, cfg := range []Config{
				{GroupSize: 32, Scheme: scheme, Bits: bits},
				{GroupSize: 64, Scheme: scheme, Bits: bits, Rotate: RotateHadamard, KeyAxis: KeyAxisChannel, Sink: 1},
			} {
				for _, tn := range src.Tensors {
					p, err := planFor(tn.Name, tn.Shape, cfg)
					if err != nil {
						t.Fatal(err)
					}
					_, ok := encodeVectorRows(&tn, p, &generalScratch{})
					if ok != haveSIMD {
						t.Errorf("%s %s: vector encoder ran %v, want %v", codecName(cfg), tn.Name, ok, haveSIMD)
					}
				}
			}
		}
	}
}

// assertSameAsScalar fails unless the vector and scalar encoders' results have
// the same payload bytes and decompress (each way) to the same tensor bytes.
func assertSameAsScalar(t *testing.T, vec, scalar *Result) {
	t.Helper()
	if len(vec.Tensors) != len(scalar.Tensors) {
		t.Fatalf("%d payloads, scalar %d", len(vec.Tensors), len(scalar.Tensors))
	}
	for i := range vec.Tensors {
		if !bytes.Equal(vec.Tensors[i].Data, scalar.Tensors[i].Data) {
			t.Fatalf("payload %s differs from the scalar encoder's", vec.Tensors[i].Name)
		}
	}
	vecOut, scalarOut := decompressBoth(t, vec)
	for i := range vecOut.Tensors {
		if !bytes.Equal(vecOut.Tensors[i].Data, scalarOut.Tensors[i].Data) {
			t.Fatalf("restored %s differs from the scalar decoder's", vecOut.Tensors[i].Name)
		}
	}
}
