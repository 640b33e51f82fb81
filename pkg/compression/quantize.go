package compression

import (
	"fmt"
	"math"
	"slices"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// qmax is the largest code magnitude used by the symmetric scheme; codes are
// clamped to [qmin, qmax] = [-8, 7].
const (
	qmax = 7
	qmin = -8
)

// groupScale returns the float16 scale of a group whose largest magnitude is m:
// float16(float32(m) / 7), rounded half to even.
func groupScale(m float32) uint16 { return safetensors.F32ToF16(m / qmax) }

// roundMagic is 1.5 × 2^23: adding and subtracting it rounds a float32 of
// magnitude below 2^22 to an integer, half to even, in float32 arithmetic.
const roundMagic = 12582912.0

// quantizeCode maps v to its code for scale s (s > 0): round half to even of
// the float32 quotient v / s, clamped to [-8, 7].
func quantizeCode(v, s float32) int32 {
	return roundClamp(v / s)
}

func roundClamp(q float32) int32 {
	if q > qmax {
		return qmax
	}
	if q < qmin {
		return qmin
	}
	r := (q + roundMagic) - roundMagic // |q| <= 8 here, so the trick is exact
	return int32(r)
}

// tieGuard is how close to a half-integer a fast quotient may come before
// quantizePair recomputes it with the exact division. Loops test f·f >
// tieGuard² (two multiplies instead of four compares); any test that catches
// every |f| above the guard is correct, since the fallback is the definition.
const tieGuard = 0.5 - 1.0/4096

// quantizePair is quantizeCode for two values, fast: it multiplies by inv =
// 1/s instead of dividing, which can differ from v / s in the last bits, and
// so falls back to the exact division whenever a quotient lies within 2^-12 of
// a rounding boundary (a half-integer), where those bits could matter.
func quantizePair(v0, v1, s, inv float32) (int32, int32) {
	t0, t1 := v0*inv, v1*inv
	f0 := t0 - ((t0 + roundMagic) - roundMagic)
	f1 := t1 - ((t1 + roundMagic) - roundMagic)
	if f0 > tieGuard || f0 < -tieGuard || f1 > tieGuard || f1 < -tieGuard {
		return quantizeCode(v0, s), quantizeCode(v1, s)
	}
	return roundClamp(t0), roundClamp(t1)
}

// dequantTable fills lut with the reconstruction of every 4-bit code (indexed
// by the nibble, two's complement) for scale s, rounded to dtype dt:
// dt(float32(code) * s). Rounding is symmetric, so negative codes mirror
// positive ones; and while 8·s stays a normal number of dt, doubling commutes
// with rounding, so only the odd codes need a conversion (1 too, except for F16).
func dequantTable(lut *[16]float32, s float32, dt safetensors.DType) {
	lut[0] = 0
	if dt == safetensors.F32 || dt == safetensors.F64 {
		for c := 1; c < 8; c++ {
			v := float32(c) * s
			lut[c], lut[16-c] = v, -v
		}
		lut[8] = -8 * s
		return
	}
	minNormal, maxFinite := float32(6.103515625e-05), float32(65504)/8 // float16
	if dt == safetensors.BF16 {
		minNormal, maxFinite = 1.1754944e-38, 3.3895314e38/8
	}
	if s >= minNormal && s <= maxFinite {
		r1 := s // a float16 scale is exact in float16
		if dt != safetensors.F16 {
			r1 = safetensors.RoundTo(dt, s)
		}
		r3 := safetensors.RoundTo(dt, 3*s)
		r5 := safetensors.RoundTo(dt, 5*s)
		r7 := safetensors.RoundTo(dt, 7*s)
		pos := [8]float32{0, r1, 2 * r1, r3, 4 * r1, r5, 2 * r3, r7}
		for c := 1; c < 8; c++ {
			lut[c], lut[16-c] = pos[c], -pos[c]
		}
		lut[8] = -8 * r1
		return
	}
	for c := 1; c < 8; c++ {
		v := safetensors.RoundTo(dt, saturate(dt, float32(c)*s))
		lut[c], lut[16-c] = v, -v
	}
	lut[8] = safetensors.RoundTo(dt, saturate(dt, -8*s))
}

// tensorStats accumulates the error of one tensor's reconstruction.
type tensorStats struct {
	n                          int64
	sumXX, sumEE, sumXY, sumYY float64
	maxErr                     float64
}

func (s *tensorStats) merge(o tensorStats) {
	s.n += o.n
	s.sumXX += o.sumXX
	s.sumEE += o.sumEE
	s.sumXY += o.sumXY
	s.sumYY += o.sumYY
	s.maxErr = max(s.maxErr, o.maxErr)
}

// quantizeTensor quantizes one tensor group by group into packed codes and
// float16 scales, and accumulates the error of the reconstruction, as stored
// in dtype dt, against the original values. src holds the tensor's raw bytes
// (dtype dt); sparse, when not nil, holds the float32 values to encode instead
// of src's (after sparsification). The element count must be a multiple of g;
// codes has n/2 bytes, scales n/g entries.
func quantizeTensor(src []byte, dt safetensors.DType, sparse []float32, g int, codes []byte, scales []uint16) (tensorStats, error) {
	var st tensorStats
	var lut [16]float32
	var buf [128]float32 // one group of original values, decoded where it is used
	width := dt.Bits() / 8
	// Error sums live in locals (two lanes each) so they stay in registers,
	// and go to the float64 totals every flushEvery elements: often enough
	// for float32 to stay accurate, rarely enough to cost little at G = 32.
	// Σxy is not accumulated: it follows from Σx², Σy² and Σ(x−y)².
	const flushEvery = 256
	var xx0, xx1, ee0, ee1, yy0, yy1 float32
	var me0, me1 uint32 // |error| as bits: integer max is cheaper than float max
	pending := 0
	for gi := range len(scales) {
		ref := buf[:g:g]
		// For non-negative floats the bit patterns order like the values, and
		// NaN and Inf sort above every finite value: one integer max finds both.
		var mb uint32
		if dt == safetensors.F16 {
			// The common case, decoded and scanned in one pass.
			in := src[gi*g*2 : (gi+1)*g*2 : (gi+1)*g*2]
			for i := range ref {
				v := safetensors.F16ToF32(uint16(in[2*i]) | uint16(in[2*i+1])<<8)
				ref[i] = v
				mb = max(mb, math.Float32bits(v)&0x7fffffff)
			}
		} else {
			if err := safetensors.DecodeFloat32(dt, src[gi*g*width:(gi+1)*g*width], ref); err != nil {
				return st, err
			}
			for _, v := range ref {
				mb = max(mb, math.Float32bits(v)&0x7fffffff)
			}
		}
		grp := ref
		if sparse != nil {
			grp = sparse[gi*g : (gi+1)*g : (gi+1)*g]
			mb = 0
			for _, v := range grp {
				mb = max(mb, math.Float32bits(v)&0x7fffffff)
			}
		}
		if mb >= 0x7f800000 {
			i := slices.IndexFunc(grp, func(v float32) bool { return math.Float32bits(v)&0x7fffffff >= 0x7f800000 })
			return st, fmt.Errorf("%w (element %d)", ErrNonFinite, gi*g+i)
		}
		m := math.Float32frombits(mb)
		s16 := groupScale(m)
		if s16 == 0x7c00 {
			return st, fmt.Errorf("%w (group %d, max |x| = %g)", ErrScaleOverflow, gi, m)
		}
		scales[gi] = s16
		s := safetensors.F16ToF32(s16)
		out := codes[gi*g/2 : (gi+1)*g/2 : (gi+1)*g/2]
		if s == 0 {
			clear(out)
			var gs groupStats
			for _, r := range ref {
				gs.add(r, 0)
			}
			st.addGroup(&gs, len(ref))
			continue
		}
		dequantTable(&lut, s, dt)
		inv := 1 / s
		// Quotients stay within ±7·(1 + 2^-11) unless the scale lost precision
		// (subnormal float16); only then can a code need clamping.
		noClamp := m*inv < 7.25
		for j := range out {
			x0, x1 := grp[2*j], grp[2*j+1]
			t0, t1 := x0*inv, x1*inv
			r0 := (t0 + roundMagic) - roundMagic
			r1 := (t1 + roundMagic) - roundMagic
			f0, f1 := t0-r0, t1-r1
			var q0, q1 int32
			switch {
			case f0*f0 > tieGuard*tieGuard || f1*f1 > tieGuard*tieGuard:
				// Near a tie the multiply may differ from the division: use the definition.
				q0, q1 = quantizeCode(x0, s), quantizeCode(x1, s)
			case noClamp:
				q0, q1 = int32(r0), int32(r1)
			default:
				q0, q1 = roundClamp(t0), roundClamp(t1)
			}
			q0, q1 = q0&0xf, q1&0xf
			out[j] = byte(q0) | byte(q1)<<4
			x0, x1 = ref[2*j], ref[2*j+1]
			y0, y1 := lut[q0], lut[q1]
			e0, e1 := x0-y0, x1-y1
			xx0 += x0 * x0
			xx1 += x1 * x1
			ee0 += e0 * e0
			ee1 += e1 * e1
			yy0 += y0 * y0
			yy1 += y1 * y1
			me0 = max(me0, math.Float32bits(e0)&0x7fffffff)
			me1 = max(me1, math.Float32bits(e1)&0x7fffffff)
		}
		if pending += len(ref); pending >= flushEvery {
			st.addLanes(xx0, xx1, ee0, ee1, yy0, yy1, max(me0, me1), pending)
			xx0, xx1, ee0, ee1, yy0, yy1, me0, me1, pending = 0, 0, 0, 0, 0, 0, 0, 0, 0
		}
	}
	st.addLanes(xx0, xx1, ee0, ee1, yy0, yy1, max(me0, me1), pending)
	return st, nil
}

// addLanes adds two-lane float32 error sums of n elements (the largest
// |error| as float32 bits) to the totals; Σxy follows from the others.
func (s *tensorStats) addLanes(xx0, xx1, ee0, ee1, yy0, yy1 float32, maxErrBits uint32, n int) {
	if n == 0 {
		return
	}
	gs := groupStats{xx: [2]float32{xx0, xx1}, ee: [2]float32{ee0, ee1}, yy: [2]float32{yy0, yy1}, maxErr: math.Float32frombits(maxErrBits)}
	gs.xy[0] = (xx0 + yy0 - ee0) / 2
	gs.xy[1] = (xx1 + yy1 - ee1) / 2
	s.addGroup(&gs, n)
}

// groupStats accumulates one group's error sums in float32, in two lanes so
// that consecutive additions do not wait on each other; tensorStats then
// sums groups in float64.
type groupStats struct {
	xx, ee, xy, yy [2]float32
	maxErr         float32
}

func (g *groupStats) add(x, y float32) {
	e := x - y
	g.xx[0] += x * x
	g.ee[0] += e * e
	g.xy[0] += x * y
	g.yy[0] += y * y
	if a := math.Float32frombits(math.Float32bits(e) &^ (1 << 31)); a > g.maxErr {
		g.maxErr = a
	}
}

func (s *tensorStats) addGroup(g *groupStats, n int) {
	s.n += int64(n)
	s.sumXX += float64(g.xx[0]) + float64(g.xx[1])
	s.sumEE += float64(g.ee[0]) + float64(g.ee[1])
	s.sumXY += float64(g.xy[0]) + float64(g.xy[1])
	s.sumYY += float64(g.yy[0]) + float64(g.yy[1])
	s.maxErr = max(s.maxErr, float64(g.maxErr))
}

func (s *tensorStats) add(x, y float32) {
	s.n++
	xd, yd := float64(x), float64(y)
	e := xd - yd
	s.sumXX += xd * xd
	s.sumEE += e * e
	s.sumXY += xd * yd
	s.sumYY += yd * yd
	if ae := math.Abs(e); ae > s.maxErr {
		s.maxErr = ae
	}
}

// sparsify zeroes, in place, every element whose magnitude is at most the k-th
// smallest magnitude of x, where k = floor(fraction × len(x)). Ties at the
// threshold are all zeroed, so slightly more than k elements may become zero.
// It returns the threshold (0 when k = 0, in which case nothing changes).
func sparsify(x []float32, fraction float64, scratch []float32) float32 {
	k := int(math.Floor(fraction * float64(len(x))))
	if k <= 0 {
		return 0
	}
	mags := scratch[:len(x)]
	for i, v := range x {
		mags[i] = float32(math.Abs(float64(v)))
	}
	t := selectKth(mags, k-1)
	for i, v := range x {
		if float32(math.Abs(float64(v))) <= t {
			x[i] = 0
		}
	}
	return t
}

// selectKth returns the element that would be at index k if a were sorted
// ascending (a is reordered). Deterministic median-of-three quickselect.
func selectKth(a []float32, k int) float32 {
	lo, hi := 0, len(a)-1
	for lo < hi {
		mid := lo + (hi-lo)/2
		if a[mid] < a[lo] {
			a[mid], a[lo] = a[lo], a[mid]
		}
		if a[hi] < a[lo] {
			a[hi], a[lo] = a[lo], a[hi]
		}
		if a[hi] < a[mid] {
			a[hi], a[mid] = a[mid], a[hi]
		}
		p := a[mid]
		i, j := lo, hi
		for i <= j {
			for a[i] < p {
				i++
			}
			for a[j] > p {
				j--
			}
			if i <= j {
				a[i], a[j] = a[j], a[i]
				i++
				j--
			}
		}
		switch {
		case k <= j:
			hi = j
		case k >= i:
			lo = i
		default:
			return a[k]
		}
	}
	return a[k]
}

// halfTable fills dst with the F16 or BF16 bits of every code's reconstruction
// for scale s: the float32 product rounded half to even, saturated to the
// dtype's largest finite value. Rounding is symmetric,
// so each negative code is its positive twin with the sign bit set.
func halfTable(dst *[16]uint16, s float32, dt safetensors.DType) {
	conv := safetensors.F32ToF16
	if dt == safetensors.BF16 {
		conv = safetensors.F32ToBF16
	}
	dst[0] = 0
	for c := 1; c < 8; c++ {
		h := conv(saturate(dt, float32(c)*s))
		dst[c], dst[16-c] = h, h|0x8000
	}
	dst[8] = conv(saturate(dt, -8*s))
}

// dequantizeTensor writes the reconstruction of packed codes with float16
// scales into dst as little-endian elements of dtype dt.
func dequantizeTensor(codes []byte, scales []uint16, g int, dt safetensors.DType, dst []byte) {
	if dequantizeTensorSIMD(codes, scales, g, dt, dst) {
		return
	}
	var lut [16]float32
	var lut16 [16]uint16
	width := dt.Bits() / 8
	for gi, s16 := range scales {
		s := safetensors.F16ToF32(s16)
		in := codes[gi*g/2 : (gi+1)*g/2]
		out := dst[gi*g*width : (gi+1)*g*width]
		switch dt {
		case safetensors.F16, safetensors.BF16:
			halfTable(&lut16, s, dt)
			for j, b := range in {
				lo, hi := lut16[b&0xf], lut16[b>>4]
				o := out[4*j : 4*j+4 : 4*j+4]
				o[0], o[1], o[2], o[3] = byte(lo), byte(lo>>8), byte(hi), byte(hi>>8)
			}
		case safetensors.F32:
			dequantTable(&lut, s, dt)
			for j, b := range in {
				putF32(out[8*j:], lut[b&0xf])
				putF32(out[8*j+4:], lut[b>>4])
			}
		case safetensors.F64:
			dequantTable(&lut, s, dt)
			for j, b := range in {
				putF64(out[16*j:], float64(lut[b&0xf]))
				putF64(out[16*j+8:], float64(lut[b>>4]))
			}
		}
	}
}

func putF32(b []byte, v float32) {
	u := math.Float32bits(v)
	_ = b[3]
	b[0], b[1], b[2], b[3] = byte(u), byte(u>>8), byte(u>>16), byte(u>>24)
}

func putF64(b []byte, v float64) {
	u := math.Float64bits(v)
	_ = b[7]
	for i := range 8 {
		b[i] = byte(u >> (8 * i))
	}
}
