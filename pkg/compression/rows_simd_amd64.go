//go:build goexperiment.simd && amd64

package compression

import (
	"math"
	"simd/archsimd"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// haveSIMD reports whether the vector row encoder runs: AVX2 is all it uses
// (no FMA, so every product and sum is rounded exactly as the scalar code
// rounds it).
var haveSIMD = archsimd.X86.AVX2()

// Lane permutations and signs of the three butterfly stages that stay inside
// one 8-lane vector. Stage h pairs lane j with lane j^h; the lower lane of a
// pair becomes a+b and the upper one a−b. With p the vector with each lane
// swapped for its partner and alt = +1 on lower lanes, −1 on upper ones,
// the stage is x·alt + p: x·alt is exact, so the one rounding of the sum is
// the scalar butterfly's.
var (
	permH1 = [8]uint32{1, 0, 3, 2, 5, 4, 7, 6}
	permH2 = [8]uint32{2, 3, 0, 1, 6, 7, 4, 5}
	permH4 = [8]uint32{4, 5, 6, 7, 0, 1, 2, 3}
	altH1  = [8]float32{1, -1, 1, -1, 1, -1, 1, -1}
	altH2  = [8]float32{1, 1, -1, -1, 1, 1, -1, -1}
	altH4  = [8]float32{1, 1, 1, 1, -1, -1, -1, -1}
)

// butterflies holds the constants of the in-vector stages in registers.
type butterflies struct {
	p1, p2, p4 archsimd.Uint32x8
	a1, a2, a4 archsimd.Float32x8
}

func newButterflies() butterflies {
	return butterflies{
		p1: archsimd.LoadUint32x8(&permH1), p2: archsimd.LoadUint32x8(&permH2), p4: archsimd.LoadUint32x8(&permH4),
		a1: archsimd.LoadFloat32x8(&altH1), a2: archsimd.LoadFloat32x8(&altH2), a4: archsimd.LoadFloat32x8(&altH4),
	}
}

// inVector runs butterfly stages h = 1, 2, 4 on the 8 lanes of x.
func (b *butterflies) inVector(x archsimd.Float32x8) archsimd.Float32x8 {
	x = x.Mul(b.a1).Add(x.Permute(b.p1))
	x = x.Mul(b.a2).Add(x.Permute(b.p2))
	return x.Mul(b.a4).Add(x.Permute(b.p4))
}

// finish is what a rotation does after its last butterfly stage: multiply
// by the scale, then (the inverse only, signs not nil) by the signs. Fused
// into the stores of the last stage, it rounds exactly as a separate pass.
type finish struct {
	sc    archsimd.Float32x8
	signs []float32
}

// apply finishes x, the 8 elements at offset at of a row.
func (f *finish) apply(x archsimd.Float32x8, at int) archsimd.Float32x8 {
	x = x.Mul(f.sc)
	if f.signs != nil {
		s := f.signs[at&(len(f.signs)-1):] // a power of two long: no division
		x = x.Mul(archsimd.LoadFloat32x8Slice(s[:8]))
	}
	return x
}

// acrossVectors runs butterfly stages h = from, 2·from, ... < n on each
// block of n elements of v (from and n multiples of 8), and fin, when not
// nil, with the stores of the last stage.
func acrossVectors(v []float32, n, from int, fin *finish) {
	for h := from; h < n; h *= 2 {
		last := fin != nil && 2*h >= n
		for i := 0; i < len(v); i += 2 * h {
			for j := i; j < i+h; j += 8 {
				a := archsimd.LoadFloat32x8Slice(v[j : j+8])
				b := archsimd.LoadFloat32x8Slice(v[j+h : j+h+8])
				s, d := a.Add(b), a.Sub(b)
				if last {
					s, d = fin.apply(s, j), fin.apply(d, j+h)
				}
				s.StoreSlice(v[j : j+8])
				d.StoreSlice(v[j+h : j+h+8])
			}
		}
	}
}

// stages64 runs butterfly stages h = 8, 16, 32 on 64 elements held as eight
// vectors, without going through memory.
func stages64(x0, x1, x2, x3, x4, x5, x6, x7 archsimd.Float32x8) (y0, y1, y2, y3, y4, y5, y6, y7 archsimd.Float32x8) {
	x0, x1 = x0.Add(x1), x0.Sub(x1)
	x2, x3 = x2.Add(x3), x2.Sub(x3)
	x4, x5 = x4.Add(x5), x4.Sub(x5)
	x6, x7 = x6.Add(x7), x6.Sub(x7)
	x0, x2 = x0.Add(x2), x0.Sub(x2)
	x1, x3 = x1.Add(x3), x1.Sub(x3)
	x4, x6 = x4.Add(x6), x4.Sub(x6)
	x5, x7 = x5.Add(x7), x5.Sub(x7)
	return x0.Add(x4), x1.Add(x5), x2.Add(x6), x3.Add(x7), x0.Sub(x4), x1.Sub(x5), x2.Sub(x6), x3.Sub(x7)
}

// blocks64 runs the stages h = 1, ..., 32 on every 64 elements of src
// (whose length is a multiple of 64) into dst (src itself or a slice of
// the same length), after multiplying by signs when not nil, and finishes
// with fin when not nil.
func blocks64(dst, src []float32, bf *butterflies, signs []float32, fin *finish) {
	for i := 0; i < len(src); i += 64 {
		b := src[i : i+64 : i+64]
		o := dst[i : i+64 : i+64]
		// Eight named vectors rather than an array, which Go would zero
		// first with legacy SSE stores (clearUpper).
		load := func(k int) archsimd.Float32x8 {
			x := archsimd.LoadFloat32x8Slice(b[8*k : 8*k+8])
			if signs != nil {
				s := signs[(i+8*k)&(len(signs)-1):] // a power of two long
				x = x.Mul(archsimd.LoadFloat32x8Slice(s[:8]))
			}
			return bf.inVector(x)
		}
		x0, x1, x2, x3, x4, x5, x6, x7 := stages64(load(0), load(1), load(2), load(3), load(4), load(5), load(6), load(7))
		if fin != nil {
			x0, x1, x2, x3 = fin.apply(x0, i), fin.apply(x1, i+8), fin.apply(x2, i+16), fin.apply(x3, i+24)
			x4, x5, x6, x7 = fin.apply(x4, i+32), fin.apply(x5, i+40), fin.apply(x6, i+48), fin.apply(x7, i+56)
		}
		x0.StoreSlice(o[0:8])
		x1.StoreSlice(o[8:16])
		x2.StoreSlice(o[16:24])
		x3.StoreSlice(o[24:32])
		x4.StoreSlice(o[32:40])
		x5.StoreSlice(o[40:48])
		x6.StoreSlice(o[48:56])
		x7.StoreSlice(o[56:64])
	}
}

// rotateForward is rotation.forward of src into dst (src itself, or a
// slice of the same length whose length is a multiple of r.n, itself a
// multiple of 8), with the same roundings in the same order: signs, the
// stages h = 1, 2, 4, ..., then the scale.
func rotateForward(r *rotation, bf *butterflies, dst, src []float32) {
	fin := finish{sc: archsimd.BroadcastFloat32x8(r.scale)}
	if r.n >= 64 {
		if r.n == 64 {
			blocks64(dst, src, bf, r.signs, &fin)
			return
		}
		blocks64(dst, src, bf, r.signs, nil)
		acrossVectors(dst, r.n, 64, &fin)
		return
	}
	for i := 0; i < len(src); i += 8 {
		x := archsimd.LoadFloat32x8Slice(src[i : i+8])
		at := i & (r.n - 1) // r.n is a power of two
		sg := archsimd.LoadFloat32x8Slice(r.signs[at : at+8])
		x = bf.inVector(x.Mul(sg))
		if r.n == 8 {
			x = fin.apply(x, i)
		}
		x.StoreSlice(dst[i : i+8])
	}
	acrossVectors(dst, r.n, 8, &fin)
}

// rotateInverse is rotation.inverse: the stages h = 1, 2, 4, ..., then
// (v·scale)·sign.
func rotateInverse(r *rotation, bf *butterflies, v []float32) {
	fin := finish{sc: archsimd.BroadcastFloat32x8(r.scale), signs: r.signs}
	if r.n >= 64 {
		if r.n == 64 {
			blocks64(v, v, bf, nil, &fin)
			return
		}
		blocks64(v, v, bf, nil, nil)
		acrossVectors(v, r.n, 64, &fin)
		return
	}
	for i := 0; i < len(v); i += 8 {
		x := bf.inVector(archsimd.LoadFloat32x8Slice(v[i : i+8]))
		if r.n == 8 {
			x = fin.apply(x, i)
		}
		x.StoreSlice(v[i : i+8])
	}
	acrossVectors(v, r.n, 8, &fin)
}

// decodeRow converts one row of dtype dt to float32 in x. It returns false if
// the row holds an Inf or a NaN.
func decodeRow(in []byte, dt safetensors.DType, x []float32) bool {
	switch dt {
	case safetensors.F16:
		// A float16's exponent and mantissa, moved to a float32's top bits,
		// read as a float32 2^112 times too small, subnormals included, so
		// one exact multiply converts every finite value.
		mask := archsimd.BroadcastUint32x8(0x7fff)
		signBit := archsimd.BroadcastUint32x8(0x8000)
		rescale := archsimd.BroadcastFloat32x8(0x1p112)
		var mx archsimd.Uint32x8
		for i := 0; i < len(x); i += 8 {
			h := archsimd.LoadUint8x16Slice(in[2*i : 2*i+16]).AsUint16x8().ExtendToUint32()
			mag := h.And(mask)
			mx = mx.Max(mag)
			f := mag.ShiftAllLeft(13).AsFloat32x8().Mul(rescale)
			f.AsUint32x8().Or(h.And(signBit).ShiftAllLeft(16)).AsFloat32x8().StoreSlice(x[i : i+8])
		}
		return maxLane(mx) < 0x7c00
	case safetensors.BF16:
		mask := archsimd.BroadcastUint32x8(0x7fff)
		var mx archsimd.Uint32x8
		for i := 0; i < len(x); i += 8 {
			h := archsimd.LoadUint8x16Slice(in[2*i : 2*i+16]).AsUint16x8().ExtendToUint32()
			mx = mx.Max(h.And(mask))
			h.ShiftAllLeft(16).AsFloat32x8().StoreSlice(x[i : i+8])
		}
		return maxLane(mx) < 0x7f80
	default: // F32
		mask := archsimd.BroadcastUint32x8(0x7fffffff)
		var mx archsimd.Uint32x8
		for i := 0; i < len(x); i += 8 {
			u := archsimd.LoadUint8x32Slice(in[4*i : 4*i+32]).AsUint32x8()
			mx = mx.Max(u.And(mask))
			u.AsFloat32x8().StoreSlice(x[i : i+8])
		}
		return maxLane(mx) < 0x7f800000
	}
}

// maxLane returns the largest lane of v. It ends the vector work of its
// caller: see clearUpper.
func maxLane(v archsimd.Uint32x8) uint32 {
	// Reduced in registers: a local array would be zeroed with legacy SSE
	// stores first.
	v = v.Max(v.Permute(archsimd.LoadUint32x8(&permH4)))
	v = v.Max(v.Permute(archsimd.LoadUint32x8(&permH2)))
	v = v.Max(v.Permute(archsimd.LoadUint32x8(&permH1)))
	m := v.GetLo().GetElem(0)
	clearUpper()
	return m
}

// clearUpper zeroes the upper halves of the vector registers (VZEROUPPER)
// before scalar code runs. Go compiles scalar floating-point code, and
// parts of the runtime such as memmove, to legacy SSE instructions, and does
// not insert VZEROUPPER itself; on some x86 CPUs (the Intel Xeon hosts this
// project's benchmarks ran on in December 2026) every SSE instruction run
// while those halves hold data costs hundreds of cycles, which made the
// vector encoders ten times slower than the scalar ones there. The compiler
// knows the instruction clobbers every vector register and saves live ones.
func clearUpper() { archsimd.ClearAVXUpperBits() }

// errorSums accumulates the error of a reconstruction in 8 float32 lanes,
// folded into 8 float64 lanes every vectorFlushEvery elements without
// leaving the vector registers; flush adds the lanes to a tensorStats once,
// at the end of a job. The float32 partial sums are as long as the scalar
// paths' (128 elements a lane); only the order of the float64 additions
// differs from theirs, far below the metrics' printed precision.
type errorSums struct {
	xx, ee, yy             archsimd.Float32x8
	xxLo, xxHi, eeLo, eeHi archsimd.Float64x4
	yyLo, yyHi             archsimd.Float64x4
	maxErr                 archsimd.Uint32x8
	pending, n             int
}

const vectorFlushEvery = 1024 // 128 per lane, as often as the scalar paths flush

// add accumulates the error of reconstruction y against x, with each
// element of y first rounded to the precision of dt, as safetensors.RoundTo
// does (y itself is left as it is). It returns false if an element of y is
// too large for that rounding (|y| ≥ 65504 for float16), with nothing added.
func (s *errorSums) add(x, y []float32, dt safetensors.DType) bool {
	absMask := archsimd.BroadcastUint32x8(0x7fffffff)
	// Float16: adding and subtracting C = 1.5·2^(e+13), where 2^e ≤ |y| (e ≥
	// −14, float16's smallest normal exponent), rounds y half to even at
	// float16's spacing for that binade, 2^(e−10), subnormals included.
	expMask := archsimd.BroadcastUint32x8(0x7f800000)
	minExp := archsimd.BroadcastUint32x8(113 << 23)
	offset := archsimd.BroadcastUint32x8(13<<23 | 0x400000)
	// Bfloat16: round half to even on the bit pattern; a carry into the
	// exponent is the correct result.
	one := archsimd.BroadcastUint32x8(1)
	bias := archsimd.BroadcastUint32x8(0x7fff)
	keep := archsimd.BroadcastUint32x8(0xffff0000)
	xx, ee, yy, me := s.xx, s.ee, s.yy, s.maxErr
	var my archsimd.Uint32x8
	for i := 0; i < len(x); i += 8 {
		xv := archsimd.LoadFloat32x8Slice(x[i : i+8])
		yv := archsimd.LoadFloat32x8Slice(y[i : i+8])
		switch dt {
		case safetensors.F16:
			u := yv.AsUint32x8()
			my = my.Max(u.And(absMask))
			c := u.And(expMask).Max(minExp).Add(offset).AsFloat32x8()
			yv = yv.Add(c).Sub(c)
		case safetensors.BF16:
			u := yv.AsUint32x8()
			yv = u.Add(bias).Add(u.ShiftAllRight(16).And(one)).And(keep).AsFloat32x8()
		}
		e := xv.Sub(yv)
		xx = xx.Add(xv.Mul(xv))
		ee = ee.Add(e.Mul(e))
		yy = yy.Add(yv.Mul(yv))
		me = me.Max(e.AsUint32x8().And(absMask))
	}
	if dt == safetensors.F16 && maxLane(my) >= 0x477fe000 { // 65504: the shortcut could round to Inf
		return false
	}
	s.xx, s.ee, s.yy, s.maxErr = xx, ee, yy, me
	s.pending += len(x)
	if s.pending >= vectorFlushEvery {
		s.fold()
	}
	return true
}

// fold moves the float32 partial sums into the float64 lanes, in vector
// registers only: no scalar or legacy SSE code runs (see clearUpper).
func (s *errorSums) fold() {
	s.xxLo, s.xxHi = s.xxLo.Add(s.xx.GetLo().ConvertToFloat64()), s.xxHi.Add(s.xx.GetHi().ConvertToFloat64())
	s.eeLo, s.eeHi = s.eeLo.Add(s.ee.GetLo().ConvertToFloat64()), s.eeHi.Add(s.ee.GetHi().ConvertToFloat64())
	s.yyLo, s.yyHi = s.yyLo.Add(s.yy.GetLo().ConvertToFloat64()), s.yyHi.Add(s.yy.GetHi().ConvertToFloat64())
	// Zero by XOR: a Go zero value would be stored with legacy SSE moves.
	z := s.maxErr.Xor(s.maxErr).AsFloat32x8()
	s.xx, s.ee, s.yy = z, z, z
	s.n += s.pending
	s.pending = 0
}

// flush adds everything accumulated to st and resets s. It ends the vector
// work of its caller.
func (s *errorSums) flush(st *tensorStats) {
	s.fold()
	if s.n == 0 {
		clearUpper()
		return
	}
	clearUpper() // before the arrays are zeroed
	var xx, ee, yy [8]float64
	s.xxLo.Store((*[4]float64)(xx[:4]))
	s.xxHi.Store((*[4]float64)(xx[4:]))
	s.eeLo.Store((*[4]float64)(ee[:4]))
	s.eeHi.Store((*[4]float64)(ee[4:]))
	s.yyLo.Store((*[4]float64)(yy[:4]))
	s.yyHi.Store((*[4]float64)(yy[4:]))
	m := maxLane(s.maxErr) // clears the upper halves again
	var sxx, see, syy float64
	for i := range 8 {
		sxx += xx[i]
		see += ee[i]
		syy += yy[i]
	}
	st.n += int64(s.n)
	st.sumXX += sxx
	st.sumEE += see
	st.sumYY += syy
	st.sumXY += (sxx + syy - see) / 2 // Σxy from Σx², Σy² and Σ(x−y)²
	st.maxErr = max(st.maxErr, float64(math.Float32frombits(m)))
	*s = errorSums{}
}

// nibbleShifts moves code i of a 32-bit word (4 bytes, low nibble first) to
// the bottom of lane i.
var nibbleShifts = [8]uint32{0, 4, 8, 12, 16, 20, 24, 28}

// packOrder puts the 32-bit units of a VPACKUSDW result, which interleaves its
// two inputs per 128-bit half, back in element order.
var packOrder = [8]uint32{0, 1, 4, 5, 2, 3, 6, 7}

// dequantizeGroup writes float32(q)·s for the len(y) codes packed in in.
func dequantizeGroup(in []byte, s float32, y []float32) {
	shifts := archsimd.LoadUint32x8(&nibbleShifts)
	nib := archsimd.BroadcastUint32x8(0xf)
	sv := archsimd.BroadcastFloat32x8(s)
	for i := 0; i < len(y); i += 8 {
		b := in[i/2 : i/2+4 : i/2+4]
		word := uint32(b[0]) | uint32(b[1])<<8 | uint32(b[2])<<16 | uint32(b[3])<<24
		q := archsimd.BroadcastUint32x8(word).ShiftRight(shifts).And(nib)
		// Sign-extend the 4-bit two's complement code.
		qi := q.ShiftAllLeft(28).AsInt32x8().ShiftAllRight(28)
		qi.ConvertToFloat32().Mul(sv).StoreSlice(y[i : i+8])
	}
	clearUpper() // the caller converts the next scale in scalar code
}

// encodeRow writes y (len a multiple of 8) as little-endian elements of dt
// into out, rounding half to even as safetensors.EncodeFloat32 does, with c
// (from newHalfConv, made once per job) for float16 and bfloat16. Whether
// every float16 element was small enough for the shortcut (|y| < 65504) is
// checked once per job, by c.fits: a job that fails it is decoded again by
// the scalar path, which rewrites all of its output.
func encodeRow(y []float32, dt safetensors.DType, out []byte, c *halfConv) {
	if dt == safetensors.F32 {
		for i := 0; i < len(y); i += 8 {
			archsimd.LoadFloat32x8Slice(y[i : i+8]).AsUint8x32().StoreSlice(out[4*i : 4*i+32])
		}
		return
	}
	packHalves(y, out, c)
}

// fits reports whether every float16 element c converted was below 65504,
// where the shortcut of conv is exact. It ends the vector work of its
// caller.
func (c *halfConv) fits() bool {
	if !c.f16 {
		clearUpper()
		return true
	}
	return maxLane(c.mx) < 0x477fe000
}

// halfConv converts float32 vectors to float16 or bfloat16 bit patterns.
// It is a struct rather than a closure, and its shifts take their counts
// from vectors: a closure's captured state and scalar shift counts went
// through legacy SSE moves on every call (clearUpper).
type halfConv struct {
	f16                                                            bool
	expMask, minExp, offset, absMask, signBit, one, bias, s13, s16 archsimd.Uint32x8
	down                                                           archsimd.Float32x8
	mx                                                             archsimd.Uint32x8 // largest |y| seen, float16 only
}

func newHalfConv(f16 bool) halfConv {
	return halfConv{
		f16:     f16,
		expMask: archsimd.BroadcastUint32x8(0x7f800000), minExp: archsimd.BroadcastUint32x8(113 << 23),
		offset: archsimd.BroadcastUint32x8(13<<23 | 0x400000), absMask: archsimd.BroadcastUint32x8(0x7fffffff),
		signBit: archsimd.BroadcastUint32x8(0x80000000), one: archsimd.BroadcastUint32x8(1),
		bias: archsimd.BroadcastUint32x8(0x7fff), s13: archsimd.BroadcastUint32x8(13), s16: archsimd.BroadcastUint32x8(16),
		down: archsimd.BroadcastFloat32x8(0x1p-112),
	}
}

// conv returns the 16-bit patterns of v, each in the low half of its lane.
func (c *halfConv) conv(v archsimd.Float32x8) archsimd.Int32x8 {
	u := v.AsUint32x8()
	if !c.f16 {
		// Bfloat16: round half to even on the bit pattern.
		return u.Add(c.bias).Add(u.ShiftRight(c.s16).And(c.one)).ShiftRight(c.s16).AsInt32x8()
	}
	// Float16: round |y| to float16's spacing as roundToDType does, then
	// scale by 2^−112: the float32 bits of the result, shifted down by 13,
	// are the float16's exponent and mantissa (subnormals included: the
	// product is then an exact float32 subnormal). The sign is put back
	// last, so −0 and tiny negatives keep it, as in F32ToF16.
	a := u.And(c.absMask)
	c.mx = c.mx.Max(a)
	k := a.And(c.expMask).Max(c.minExp).Add(c.offset).AsFloat32x8()
	r := a.AsFloat32x8().Add(k).Sub(k).Mul(c.down).AsUint32x8().ShiftRight(c.s13)
	return r.Or(u.And(c.signBit).ShiftRight(c.s16)).AsInt32x8()
}

// packHalves converts y with c and stores the 16-bit patterns little-endian
// in out.
func packHalves(y []float32, out []byte, c *halfConv) {
	order := archsimd.LoadUint32x8(&packOrder)
	i := 0
	for ; i+16 <= len(y); i += 16 {
		a := c.conv(archsimd.LoadFloat32x8Slice(y[i : i+8]))
		b := c.conv(archsimd.LoadFloat32x8Slice(y[i+8 : i+16]))
		a.SaturateToUint16ConcatGrouped(b).AsUint32x8().Permute(order).AsUint8x32().StoreSlice(out[2*i : 2*i+32])
	}
	if i < len(y) { // one last vector of 8
		var h [8]int32
		c.conv(archsimd.LoadFloat32x8Slice(y[i : i+8])).Store(&h)
		for k, v := range h {
			out[2*(i+k)], out[2*(i+k)+1] = byte(v), byte(v>>8)
		}
	}
}

func decodeRowsSIMD(job *rowDecodeJob) bool {
	if job.general() {
		return decodeRowsBits(job)
	}
	dim, g := job.dim, job.group
	width := job.dt.Bits() / 8
	rows := len(job.dst) / (dim * width)
	y := make([]float32, dim)
	hc := newHalfConv(job.dt == safetensors.F16)
	var bf butterflies
	if job.rot != nil {
		bf = newButterflies()
	}
	groupsRow := dim / g
	// A group of 64 under the rotation of 64 (the default codec's values)
	// goes from codes to output bytes in registers.
	fused := job.rot != nil && job.rot.n == 64 && g == 64
	for r := range rows {
		if fused {
			for k := range groupsRow {
				gi := r*groupsRow + k
				s16 := uint16(job.scales[2*gi]) | uint16(job.scales[2*gi+1])<<8
				if s16&0x7c00 == 0x7c00 || s16&0x8000 != 0 {
					return false // corrupt: the scalar path names the scale
				}
				o := job.dst[(r*dim+k*64)*width : (r*dim+(k+1)*64)*width]
				dequantInverseEncode64(job.codes[gi*32:(gi+1)*32], safetensors.F16ToF32(s16), job.rot, &bf, job.dt, o, &hc)
				clearUpper() // the next scale is converted in scalar code
			}
			continue
		}
		for k := range groupsRow {
			gi := r*groupsRow + k
			s16 := uint16(job.scales[2*gi]) | uint16(job.scales[2*gi+1])<<8
			if s16&0x7c00 == 0x7c00 || s16&0x8000 != 0 {
				return false // corrupt: the scalar path names the scale
			}
			dequantizeGroup(job.codes[gi*g/2:(gi+1)*g/2], safetensors.F16ToF32(s16), y[k*g:(k+1)*g])
		}
		switch {
		case job.rot != nil && job.rot.n == 64:
			inverseEncode64(job.rot, &bf, y, job.dt, job.dst[r*dim*width:(r+1)*dim*width], &hc)
		case job.rot != nil:
			rotateInverse(job.rot, &bf, y)
			fallthrough
		default:
			encodeRow(y, job.dt, job.dst[r*dim*width:(r+1)*dim*width], &hc)
		}
		clearUpper() // the next row's scales are converted in scalar code
	}
	return hc.fits()
}

func decodeChannelsSIMD(job *rowDecodeJob, keep int, y []float32) bool {
	if job.general() {
		return decodeChannelsBits(job, keep, y)
	}
	dim, g := job.dim, job.group
	width := job.dt.Bits() / 8
	groupsRow := (keep + g - 1) / g
	hc := newHalfConv(job.dt == safetensors.F16)
	nib := archsimd.BroadcastUint32x8(0xf)
	var words [8]uint32
	var scl [8]float32
	// Code j's shift within a word, as vectors: a shift by a scalar count
	// would load it with a legacy SSE move (clearUpper).
	var shifts [8]archsimd.Uint32x8
	for j := range shifts {
		shifts[j] = archsimd.BroadcastUint32x8(uint32(4 * j))
	}
	for cb := 0; cb < dim; cb += 8 {
		for k := range groupsRow {
			clearUpper() // scalar float code follows
			for l := range 8 {
				gi := (cb+l)*groupsRow + k
				s16 := uint16(job.scales[2*gi]) | uint16(job.scales[2*gi+1])<<8
				if s16&0x7c00 == 0x7c00 || s16&0x8000 != 0 {
					return false // corrupt: the scalar path names the scale
				}
				scl[l] = safetensors.F16ToF32(s16)
			}
			sv := archsimd.LoadFloat32x8(&scl)
			for t0 := k * g; t0 < min((k+1)*g, keep); t0 += 8 {
				for l := range 8 {
					words[l] = nibbleWord(job.codes, (cb+l)*keep+t0)
				}
				wv := archsimd.LoadUint32x8(&words)
				for t := t0; t < min(t0+8, keep); t++ {
					// Lane l takes code t−t0 of its word, sign-extended.
					q := wv.ShiftRight(shifts[t-t0]).And(nib)
					qi := q.ShiftAllLeft(28).AsInt32x8().ShiftAllRight(28)
					qi.ConvertToFloat32().Mul(sv).StoreSlice(y[t*dim+cb : t*dim+cb+8])
				}
			}
		}
	}
	var bf butterflies
	if job.rot != nil {
		bf = newButterflies()
	}
	for t := range keep {
		row, out := y[t*dim:(t+1)*dim], job.dst[t*dim*width:(t+1)*dim*width]
		switch {
		case job.rot != nil && job.rot.n == 64:
			inverseEncode64(job.rot, &bf, row, job.dt, out, &hc)
		case job.rot != nil:
			rotateInverse(job.rot, &bf, row)
			fallthrough
		default:
			encodeRow(row, job.dt, out, &hc)
		}
	}
	return hc.fits()
}
