package compression

import (
	"math"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// Largest finite values of the 16-bit float dtypes, as float32.
const (
	maxFiniteF16  = 65504
	maxFiniteBF16 = 3.3895313892515355e38 // 0x7f7f
)

// maxFinite is the largest finite value of dtype dt as a float32:
// reconstructions are float32, so F32 and F64 share float32's maximum.
func maxFinite(dt safetensors.DType) float32 {
	switch dt {
	case safetensors.F16:
		return maxFiniteF16
	case safetensors.BF16:
		return maxFiniteBF16
	default:
		return math.MaxFloat32
	}
}

// saturate limits a reconstruction to ±maxFinite(dt) before it is rounded to
// dt, so a value that would round past the dtype's range (65504 rounds to
// Inf in float16 from 65520 up) becomes the largest finite value instead of
// ±Inf (docs/format.md, section 3). Rounding is monotonic, so clamping first
// and rounding after gives the same result as saturating the rounded value.
func saturate(dt safetensors.DType, v float32) float32 {
	m := maxFinite(dt)
	if v > m {
		return m
	}
	if v < -m {
		return -m
	}
	return v
}

// saturateAll applies saturate to every element of v, in place.
func saturateAll(dt safetensors.DType, v []float32) {
	if dt != safetensors.F16 && dt != safetensors.BF16 {
		return // float32 reconstructions are finite: nothing to clamp
	}
	m := maxFinite(dt)
	for i, x := range v {
		v[i] = min(max(x, -m), m)
	}
}

// addExact accumulates elements reconstructed exactly (sink positions) in
// float64 directly: they are arbitrary finite values of the input dtype, and
// float32 partial sums of their squares would overflow past 1.8e19.
func (s *tensorStats) addExact(x []float32) {
	for _, v := range x {
		d := float64(v)
		s.sumXX += d * d
		s.sumXY += d * d
		s.sumYY += d * d
	}
	s.n += int64(len(x))
}
