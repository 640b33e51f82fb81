package safetensors

import (
	"encoding/binary"
	"fmt"
	"math"
)

// f16Table maps every IEEE 754 binary16 bit pattern to its float32 value.
var f16Table = func() *[1 << 16]float32 {
	var t [1 << 16]float32
	for i := range t {
		t[i] = f16ToF32Slow(uint16(i))
	}
	return &t
}()

func f16ToF32Slow(h uint16) float32 {
	sign := uint32(h&0x8000) << 16
	exp := uint32(h>>10) & 0x1f
	mant := uint32(h & 0x3ff)
	switch {
	case exp == 0x1f: // Inf or NaN: keep the payload.
		return math.Float32frombits(sign | 0x7f800000 | mant<<13)
	case exp != 0: // normal
		return math.Float32frombits(sign | (exp+112)<<23 | mant<<13)
	case mant == 0: // signed zero
		return math.Float32frombits(sign)
	default: // subnormal: mant × 2^-24, exact in float32
		v := float32(mant) * (1.0 / (1 << 24))
		return math.Float32frombits(sign | math.Float32bits(v))
	}
}

// F16ToF32 converts a binary16 bit pattern to float32. The conversion is exact.
func F16ToF32(h uint16) float32 { return f16Table[h] }

// F32ToF16 converts a float32 to the nearest binary16 bit pattern, rounding
// half to even. Values beyond the binary16 range become ±Inf; NaN becomes a
// quiet NaN (0x7E00 with the sign kept), as PyTorch does.
func F32ToF16(f float32) uint16 {
	b := math.Float32bits(f)
	if abs := b & 0x7fffffff; abs >= 0x38800000 && abs < 0x477ff000 {
		// Fast path: the result is a normal float16 (2^-14 <= |f| < 65520).
		// Rebase the exponent, then round the 13 dropped bits half to even.
		r := abs - 0x38000000 + 0x0fff + (abs>>13)&1
		return uint16(b>>16)&0x8000 | uint16(r>>13)
	}
	sign := uint16(b>>16) & 0x8000
	exp := int32(b>>23) & 0xff
	mant := b & 0x7fffff
	if exp == 0xff {
		if mant != 0 {
			return sign | 0x7e00
		}
		return sign | 0x7c00
	}
	e := exp - 127 + 15
	if e >= 0x1f {
		return sign | 0x7c00
	}
	if e >= 1 {
		h := uint32(e)<<10 | mant>>13
		rem := mant & 0x1fff
		if rem > 0x1000 || (rem == 0x1000 && h&1 == 1) {
			h++ // may carry into the exponent, up to Inf: correct for round-to-nearest-even
		}
		return sign | uint16(h)
	}
	// Result is subnormal or zero: the value in units of 2^-24 is m >> shift.
	shift := uint32(126 - exp)
	if shift >= 25 || exp == 0 {
		return sign // below half the smallest subnormal (float32 subnormals included)
	}
	m := mant | 0x800000
	r := m >> shift
	rem := m & (1<<shift - 1)
	half := uint32(1) << (shift - 1)
	if rem > half || (rem == half && r&1 == 1) {
		r++ // may become 0x400, the smallest normal, which is the right encoding
	}
	return sign | uint16(r)
}

// BF16ToF32 converts a bfloat16 bit pattern to float32. The conversion is exact.
func BF16ToF32(h uint16) float32 { return math.Float32frombits(uint32(h) << 16) }

// F32ToBF16 converts a float32 to the nearest bfloat16 bit pattern, rounding
// half to even; NaN becomes a quiet NaN (0x7FC0 with the sign kept).
func F32ToBF16(f float32) uint16 {
	b := math.Float32bits(f)
	if b&0x7fffffff > 0x7f800000 {
		return uint16(b>>16)&0x8000 | 0x7fc0
	}
	b += 0x7fff + (b>>16)&1
	return uint16(b >> 16)
}

// DecodeFloat32 converts len(dst) little-endian elements of a floating-point
// dtype (F16, BF16, F32, F64) from src to float32. F64 values are rounded to
// the nearest float32.
func DecodeFloat32(dt DType, src []byte, dst []float32) error {
	n := len(dst)
	if len(src) < n*dt.Bits()/8 {
		return fmt.Errorf("%w: %d bytes for %d %s elements", ErrSizeMismatch, len(src), n, dt)
	}
	switch dt {
	case F16:
		src = src[:2*n]
		for i := range dst {
			dst[i] = f16Table[binary.LittleEndian.Uint16(src[2*i:])]
		}
	case BF16:
		src = src[:2*n]
		for i := range dst {
			dst[i] = math.Float32frombits(uint32(binary.LittleEndian.Uint16(src[2*i:])) << 16)
		}
	case F32:
		src = src[:4*n]
		for i := range dst {
			dst[i] = math.Float32frombits(binary.LittleEndian.Uint32(src[4*i:]))
		}
	case F64:
		src = src[:8*n]
		for i := range dst {
			dst[i] = float32(math.Float64frombits(binary.LittleEndian.Uint64(src[8*i:])))
		}
	default:
		return fmt.Errorf("%w: %s is not a floating-point dtype", ErrDType, dt)
	}
	return nil
}

// EncodeFloat32 converts src to little-endian elements of dtype dt in dst,
// rounding half to even for F16 and BF16.
func EncodeFloat32(dt DType, src []float32, dst []byte) error {
	n := len(src)
	if len(dst) < n*dt.Bits()/8 {
		return fmt.Errorf("%w: %d bytes for %d %s elements", ErrSizeMismatch, len(dst), n, dt)
	}
	switch dt {
	case F16:
		for i, v := range src {
			binary.LittleEndian.PutUint16(dst[2*i:], F32ToF16(v))
		}
	case BF16:
		for i, v := range src {
			binary.LittleEndian.PutUint16(dst[2*i:], F32ToBF16(v))
		}
	case F32:
		for i, v := range src {
			binary.LittleEndian.PutUint32(dst[4*i:], math.Float32bits(v))
		}
	case F64:
		for i, v := range src {
			binary.LittleEndian.PutUint64(dst[8*i:], math.Float64bits(float64(v)))
		}
	default:
		return fmt.Errorf("%w: %s is not a floating-point dtype", ErrDType, dt)
	}
	return nil
}

// RoundTo returns v rounded to the precision of dt and converted back to
// float32: the value a reader of a dt file would see.
func RoundTo(dt DType, v float32) float32 {
	switch dt {
	case F16:
		return f16Table[F32ToF16(v)]
	case BF16:
		return BF16ToF32(F32ToBF16(v))
	default:
		return v
	}
}
