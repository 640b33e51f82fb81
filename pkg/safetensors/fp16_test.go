package safetensors

import (
	"math"
	"math/rand/v2"
	"testing"
)

// TestF16RoundTripAllPatterns checks that every binary16 pattern survives
// F16 -> float32 -> F16 (NaNs map to a NaN).
func TestF16RoundTripAllPatterns(t *testing.T) {
	for i := 0; i < 1<<16; i++ {
		h := uint16(i)
		f := F16ToF32(h)
		back := F32ToF16(f)
		if f != f { // NaN
			if back&0x7c00 != 0x7c00 || back&0x3ff == 0 {
				t.Fatalf("NaN %#04x -> %#04x, not a NaN", h, back)
			}
			continue
		}
		if back != h {
			t.Fatalf("%#04x -> %v -> %#04x", h, f, back)
		}
	}
}

func TestBF16RoundTripAllPatterns(t *testing.T) {
	for i := 0; i < 1<<16; i++ {
		h := uint16(i)
		f := BF16ToF32(h)
		back := F32ToBF16(f)
		if f != f {
			if back&0x7f80 != 0x7f80 || back&0x7f == 0 {
				t.Fatalf("NaN %#04x -> %#04x, not a NaN", h, back)
			}
			continue
		}
		if back != h {
			t.Fatalf("%#04x -> %v -> %#04x", h, f, back)
		}
	}
}

// f32ToF16Reference rounds through float64 arithmetic: the nearest binary16
// value, ties to even, found by comparing the two neighbours.
func f32ToF16Reference(f float32) uint16 {
	if f != f {
		return 0x7e00
	}
	x := float64(f)
	sign := uint16(0)
	if math.Signbit(x) {
		sign, x = 0x8000, -x
	}
	best := uint16(0)
	// Binary search over positive finite patterns (monotonic in value).
	lo, hi := 0, 0x7bff
	for lo < hi {
		mid := (lo + hi + 1) / 2
		if float64(F16ToF32(uint16(mid))) <= x {
			lo = mid
		} else {
			hi = mid - 1
		}
	}
	best = uint16(lo)
	below := float64(F16ToF32(best))
	var above float64
	if best == 0x7bff {
		above = 65536 // the rounding boundary to Inf is 65520, the midpoint to 2^16
	} else {
		above = float64(F16ToF32(best + 1))
	}
	switch d1, d2 := x-below, above-x; {
	case d1 < d2:
	case d2 < d1, best&1 == 1:
		best++
	}
	if best >= 0x7c00 {
		best = 0x7c00
	}
	return sign | best
}

func TestF32ToF16Rounding(t *testing.T) {
	tests := []struct {
		name string
		in   float32
		want uint16
	}{
		{"one", 1, 0x3c00},
		{"tie rounds to even (down)", 1 + 1.0/2048, 0x3c00},
		{"tie rounds to even (up)", 1 + 3.0/2048, 0x3c02},
		{"max", 65504, 0x7bff},
		{"just below overflow boundary", 65519.99, 0x7bff},
		{"overflow boundary ties to Inf", 65520, 0x7c00},
		{"smallest subnormal", float32(math.Ldexp(1, -24)), 0x0001},
		{"half smallest subnormal ties to zero", float32(math.Ldexp(1, -25)), 0x0000},
		{"just above half smallest subnormal", float32(math.Ldexp(1.0001, -25)), 0x0001},
		{"negative zero", float32(math.Copysign(0, -1)), 0x8000},
		{"-Inf", float32(math.Inf(-1)), 0xfc00},
		{"largest subnormal to smallest normal", float32(math.Ldexp(1023.5, -24)), 0x0400},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := F32ToF16(tc.in); got != tc.want {
				t.Fatalf("F32ToF16(%g) = %#04x, want %#04x", tc.in, got, tc.want)
			}
		})
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 200000; i++ {
		f := math.Float32frombits(rng.Uint32())
		if f != f || math.IsInf(float64(f), 0) {
			continue
		}
		if got, want := F32ToF16(f), f32ToF16Reference(f); got != want {
			t.Fatalf("F32ToF16(%g [%#08x]) = %#04x, want %#04x", f, math.Float32bits(f), got, want)
		}
	}
}

func TestF32ToBF16Rounding(t *testing.T) {
	tests := []struct {
		in   uint32
		want uint16
	}{
		{0x3f800000, 0x3f80},
		{0x3f808000, 0x3f80}, // tie, even stays
		{0x3f818000, 0x3f82}, // tie, odd rounds up
		{0x3f808001, 0x3f81},
		{0x7f7fffff, 0x7f80}, // max float32 rounds to Inf
		{0x7fc00001, 0x7fc0}, // NaN
	}
	for _, tc := range tests {
		if got := F32ToBF16(math.Float32frombits(tc.in)); got != tc.want {
			t.Errorf("F32ToBF16(%#08x) = %#04x, want %#04x", tc.in, got, tc.want)
		}
	}
}

func TestEncodeDecodeFloat32(t *testing.T) {
	vals := []float32{0, 1, -2.5, 0.1, 1e-3, 3.14159}
	for _, dt := range []DType{F16, BF16, F32, F64} {
		t.Run(string(dt), func(t *testing.T) {
			buf := make([]byte, len(vals)*dt.Bits()/8)
			if err := EncodeFloat32(dt, vals, buf); err != nil {
				t.Fatal(err)
			}
			got := make([]float32, len(vals))
			if err := DecodeFloat32(dt, buf, got); err != nil {
				t.Fatal(err)
			}
			for i, v := range vals {
				if want := RoundTo(dt, v); got[i] != want {
					t.Errorf("element %d: %v, want %v", i, got[i], want)
				}
			}
		})
	}
	if err := DecodeFloat32(I32, make([]byte, 8), make([]float32, 2)); err == nil {
		t.Error("DecodeFloat32(I32) succeeded")
	}
	if err := DecodeFloat32(F16, make([]byte, 3), make([]float32, 2)); err == nil {
		t.Error("DecodeFloat32 with short input succeeded")
	}
}

func BenchmarkDecodeF16(b *testing.B) {
	src := make([]byte, 1<<20)
	dst := make([]float32, len(src)/2)
	b.SetBytes(int64(len(src)))
	for b.Loop() {
		DecodeFloat32(F16, src, dst)
	}
}

func TestBitsMatchesTable(t *testing.T) {
	for d, want := range dtypeBits {
		if got := d.Bits(); got != want {
			t.Errorf("%s.Bits() = %d, want %d", d, got, want)
		}
	}
	if DType("X").Bits() != 0 {
		t.Error("unknown dtype has a width")
	}
}
