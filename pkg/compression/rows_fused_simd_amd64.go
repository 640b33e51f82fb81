//go:build goexperiment.simd && amd64

package compression

import (
	"simd/archsimd"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// inverseEncode64 is rotateInverse followed by encodeRow for a row y whose
// rotation block is 64 long (len(y) a multiple of 64): each block of 64
// goes through the butterflies, the scale and the signs in registers and
// is stored straight as elements of dt into out, with the same operations
// in the same order as the two passes, so with the same roundings. y is
// left as it was.
func inverseEncode64(r *rotation, bf *butterflies, y []float32, dt safetensors.DType, out []byte, c *halfConv) {
	fin := finish{sc: archsimd.BroadcastFloat32x8(r.scale), signs: r.signs}
	width := dt.Bits() / 8
	for i := 0; i < len(y); i += 64 {
		b := y[i : i+64 : i+64]
		// Eight named vectors rather than an array (see blocks64).
		load := func(k int) archsimd.Float32x8 {
			return bf.inVector(archsimd.LoadFloat32x8Slice(b[8*k : 8*k+8]))
		}
		x0, x1, x2, x3, x4, x5, x6, x7 := stages64(load(0), load(1), load(2), load(3), load(4), load(5), load(6), load(7))
		// The block's signs start at 0: r.signs is 64 long.
		x0, x1, x2, x3 = fin.apply(x0, 0), fin.apply(x1, 8), fin.apply(x2, 16), fin.apply(x3, 24)
		x4, x5, x6, x7 = fin.apply(x4, 32), fin.apply(x5, 40), fin.apply(x6, 48), fin.apply(x7, 56)
		o := out[i*width : (i+64)*width : (i+64)*width]
		if dt == safetensors.F32 {
			x0.AsUint8x32().StoreSlice(o[0:32])
			x1.AsUint8x32().StoreSlice(o[32:64])
			x2.AsUint8x32().StoreSlice(o[64:96])
			x3.AsUint8x32().StoreSlice(o[96:128])
			x4.AsUint8x32().StoreSlice(o[128:160])
			x5.AsUint8x32().StoreSlice(o[160:192])
			x6.AsUint8x32().StoreSlice(o[192:224])
			x7.AsUint8x32().StoreSlice(o[224:256])
			continue
		}
		c.pair(x0, x1, o[0:32])
		c.pair(x2, x3, o[32:64])
		c.pair(x4, x5, o[64:96])
		c.pair(x6, x7, o[96:128])
	}
}

// pair converts 16 elements, a then b, and stores their 16-bit patterns
// little-endian in out (32 bytes), as packHalves does.
func (c *halfConv) pair(a, b archsimd.Float32x8, out []byte) {
	order := archsimd.LoadUint32x8(&packOrder)
	c.conv(a).SaturateToUint16ConcatGrouped(c.conv(b)).AsUint32x8().Permute(order).AsUint8x32().StoreSlice(out)
}

// quantizeGroupMeasured is quantizeGroup for a job whose error is measured
// on the values as quantized (in the rotated basis, dt F32) or, without a
// rotation, as stored (each value first rounded to dt, as errorSums.add
// does): instead of storing the codes' values it adds their error against
// v to sums while they are in registers. The float16 magnitudes' bits are
// folded into ymax: the rounding shortcut holds below 65504, which the
// caller checks once per job (roundedFits).
func quantizeGroupMeasured(v []float32, s float32, out []byte, packed *[4]uint64, sums *errorSums, dt safetensors.DType, ymax *archsimd.Uint32x8) {
	sv := archsimd.BroadcastFloat32x8(s)
	lo := archsimd.BroadcastFloat32x8(qmin)
	hi := archsimd.BroadcastFloat32x8(qmax)
	nib := archsimd.BroadcastInt32x8(0xf)
	fold := archsimd.BroadcastUint64x4(28)
	absMask := archsimd.BroadcastUint32x8(0x7fffffff)
	// The roundings of errorSums.add.
	expMask := archsimd.BroadcastUint32x8(0x7f800000)
	minExp := archsimd.BroadcastUint32x8(113 << 23)
	offset := archsimd.BroadcastUint32x8(13<<23 | 0x400000)
	one := archsimd.BroadcastUint32x8(1)
	bias := archsimd.BroadcastUint32x8(0x7fff)
	keep := archsimd.BroadcastUint32x8(0xffff0000)
	xx, ee, yy, me, my := sums.xx, sums.ee, sums.yy, sums.maxErr, *ymax
	for i := 0; i < len(v); i += 8 {
		x := archsimd.LoadFloat32x8Slice(v[i : i+8])
		q := x.Div(sv).RoundToEven().Max(lo).Min(hi)
		rec := q.Mul(sv)
		switch dt {
		case safetensors.F16:
			u := rec.AsUint32x8()
			my = my.Max(u.And(absMask))
			c := u.And(expMask).Max(minExp).Add(offset).AsFloat32x8()
			rec = rec.Add(c).Sub(c)
		case safetensors.BF16:
			u := rec.AsUint32x8()
			rec = u.Add(bias).Add(u.ShiftAllRight(16).And(one)).And(keep).AsFloat32x8()
		}
		e := x.Sub(rec)
		xx = xx.Add(x.Mul(x))
		ee = ee.Add(e.Mul(e))
		yy = yy.Add(rec.Mul(rec))
		me = me.Max(e.AsUint32x8().And(absMask))
		w := q.ConvertToInt32().And(nib).AsUint64x4()
		w.Or(w.ShiftRight(fold)).Store(packed)
		o := out[i/2 : i/2+4 : i/2+4]
		o[0], o[1], o[2], o[3] = byte(packed[0]), byte(packed[1]), byte(packed[2]), byte(packed[3])
	}
	sums.xx, sums.ee, sums.yy, sums.maxErr, *ymax = xx, ee, yy, me, my
	sums.count(len(v))
}

// roundedFits reports whether every float16 value quantizeGroupMeasured
// folded into ymax was below 65504, where its rounding shortcut is exact
// (the limit errorSums.add applies). It ends the vector work of its caller.
func roundedFits(ymax archsimd.Uint32x8) bool { return maxLane(ymax) < 0x477fe000 }

// merge adds partial sums of n elements, accumulated as add accumulates
// them, to s.
func (s *errorSums) merge(xx, ee, yy archsimd.Float32x8, me archsimd.Uint32x8, n int) {
	s.xx, s.ee, s.yy, s.maxErr = s.xx.Add(xx), s.ee.Add(ee), s.yy.Add(yy), s.maxErr.Max(me)
	s.count(n)
}

// count records n more elements in the float32 sums, folding them into
// the float64 lanes as add does.
func (s *errorSums) count(n int) {
	s.pending += n
	if s.pending >= vectorFlushEvery {
		s.fold()
	}
}

// f16Vec converts the 8 float16 elements at element offset i of in to
// float32 as decodeRow does, and returns their magnitudes' bits too.
func f16Vec(in []byte, i int, mask, signBit archsimd.Uint32x8, rescale archsimd.Float32x8) (archsimd.Float32x8, archsimd.Uint32x8) {
	h := archsimd.LoadUint8x16Slice(in[2*i : 2*i+16]).AsUint16x8().ExtendToUint32()
	mag := h.And(mask)
	f := mag.ShiftAllLeft(13).AsFloat32x8().Mul(rescale)
	return f.AsUint32x8().Or(h.And(signBit).ShiftAllLeft(16)).AsFloat32x8(), mag
}

// decodeRotate64 is decodeRow followed by rotateForward for a float16 row
// whose rotation block is 64 long: each block of 64 elements of in goes
// through the conversion, the signs, the butterflies and the scale in
// registers into dst, with the same operations in the same order. The
// magnitudes' bits are folded into mx, for finiteBits.
func decodeRotate64(r *rotation, bf *butterflies, in []byte, dst []float32, mx *archsimd.Uint32x8) {
	fin := finish{sc: archsimd.BroadcastFloat32x8(r.scale)}
	mask, signBit := archsimd.BroadcastUint32x8(0x7fff), archsimd.BroadcastUint32x8(0x8000)
	rescale := archsimd.BroadcastFloat32x8(0x1p112)
	sg := r.signs[:64:64] // r.n is 64
	m := *mx
	for i := 0; i < len(dst); i += 64 {
		// Eight named vectors, no closure: a closure here is not inlined,
		// and its vectors would go through memory.
		x0, m0 := f16Vec(in, i, mask, signBit, rescale)
		x1, m1 := f16Vec(in, i+8, mask, signBit, rescale)
		x2, m2 := f16Vec(in, i+16, mask, signBit, rescale)
		x3, m3 := f16Vec(in, i+24, mask, signBit, rescale)
		x4, m4 := f16Vec(in, i+32, mask, signBit, rescale)
		x5, m5 := f16Vec(in, i+40, mask, signBit, rescale)
		x6, m6 := f16Vec(in, i+48, mask, signBit, rescale)
		x7, m7 := f16Vec(in, i+56, mask, signBit, rescale)
		m = m.Max(m0).Max(m1).Max(m2).Max(m3).Max(m4).Max(m5).Max(m6).Max(m7)
		x0 = bf.inVector(x0.Mul(archsimd.LoadFloat32x8Slice(sg[0:8])))
		x1 = bf.inVector(x1.Mul(archsimd.LoadFloat32x8Slice(sg[8:16])))
		x2 = bf.inVector(x2.Mul(archsimd.LoadFloat32x8Slice(sg[16:24])))
		x3 = bf.inVector(x3.Mul(archsimd.LoadFloat32x8Slice(sg[24:32])))
		x4 = bf.inVector(x4.Mul(archsimd.LoadFloat32x8Slice(sg[32:40])))
		x5 = bf.inVector(x5.Mul(archsimd.LoadFloat32x8Slice(sg[40:48])))
		x6 = bf.inVector(x6.Mul(archsimd.LoadFloat32x8Slice(sg[48:56])))
		x7 = bf.inVector(x7.Mul(archsimd.LoadFloat32x8Slice(sg[56:64])))
		x0, x1, x2, x3, x4, x5, x6, x7 = stages64(x0, x1, x2, x3, x4, x5, x6, x7)
		o := dst[i : i+64 : i+64]
		x0.Mul(fin.sc).StoreSlice(o[0:8])
		x1.Mul(fin.sc).StoreSlice(o[8:16])
		x2.Mul(fin.sc).StoreSlice(o[16:24])
		x3.Mul(fin.sc).StoreSlice(o[24:32])
		x4.Mul(fin.sc).StoreSlice(o[32:40])
		x5.Mul(fin.sc).StoreSlice(o[40:48])
		x6.Mul(fin.sc).StoreSlice(o[48:56])
		x7.Mul(fin.sc).StoreSlice(o[56:64])
	}
	*mx = m
}

// finiteBits reports whether the largest float16 magnitude's bits that
// decodeRotate64 folded into mx belong to a finite value. It ends the
// vector work of its caller.
func finiteBits(mx archsimd.Uint32x8) bool { return maxLane(mx) < 0x7c00 }

// dequantInverseEncode64 is dequantizeGroup, rotateInverse and encodeRow
// for one block of 64 elements under one scale s: its 32 bytes of codes go
// through float32(q)·s, the butterflies, the scale and the signs in
// registers and are stored as elements of dt into out, with the same
// operations in the same order as the three passes. r.n is 64.
func dequantInverseEncode64(codes []byte, s float32, r *rotation, bf *butterflies, dt safetensors.DType, out []byte, c *halfConv) {
	shifts := archsimd.LoadUint32x8(&nibbleShifts)
	nib := archsimd.BroadcastUint32x8(0xf)
	sv := archsimd.BroadcastFloat32x8(s)
	sc := archsimd.BroadcastFloat32x8(r.scale)
	sg := r.signs[:64:64]
	// The 8 words of codes in one vector; lane k is spread to every lane
	// by a permutation. Loading them one by one as scalars made the
	// compiler spill them with legacy SSE moves (clearUpper).
	w := archsimd.LoadUint8x32Slice(codes[:32]).AsUint32x8()
	x0 := bf.inVector(nibbles8(w, 0, shifts, nib).Mul(sv))
	x1 := bf.inVector(nibbles8(w, 1, shifts, nib).Mul(sv))
	x2 := bf.inVector(nibbles8(w, 2, shifts, nib).Mul(sv))
	x3 := bf.inVector(nibbles8(w, 3, shifts, nib).Mul(sv))
	x4 := bf.inVector(nibbles8(w, 4, shifts, nib).Mul(sv))
	x5 := bf.inVector(nibbles8(w, 5, shifts, nib).Mul(sv))
	x6 := bf.inVector(nibbles8(w, 6, shifts, nib).Mul(sv))
	x7 := bf.inVector(nibbles8(w, 7, shifts, nib).Mul(sv))
	x0, x1, x2, x3, x4, x5, x6, x7 = stages64(x0, x1, x2, x3, x4, x5, x6, x7)
	x0 = x0.Mul(sc).Mul(archsimd.LoadFloat32x8Slice(sg[0:8]))
	x1 = x1.Mul(sc).Mul(archsimd.LoadFloat32x8Slice(sg[8:16]))
	x2 = x2.Mul(sc).Mul(archsimd.LoadFloat32x8Slice(sg[16:24]))
	x3 = x3.Mul(sc).Mul(archsimd.LoadFloat32x8Slice(sg[24:32]))
	x4 = x4.Mul(sc).Mul(archsimd.LoadFloat32x8Slice(sg[32:40]))
	x5 = x5.Mul(sc).Mul(archsimd.LoadFloat32x8Slice(sg[40:48]))
	x6 = x6.Mul(sc).Mul(archsimd.LoadFloat32x8Slice(sg[48:56]))
	x7 = x7.Mul(sc).Mul(archsimd.LoadFloat32x8Slice(sg[56:64]))
	if dt == safetensors.F32 {
		o := out[:256:256]
		x0.AsUint8x32().StoreSlice(o[0:32])
		x1.AsUint8x32().StoreSlice(o[32:64])
		x2.AsUint8x32().StoreSlice(o[64:96])
		x3.AsUint8x32().StoreSlice(o[96:128])
		x4.AsUint8x32().StoreSlice(o[128:160])
		x5.AsUint8x32().StoreSlice(o[160:192])
		x6.AsUint8x32().StoreSlice(o[192:224])
		x7.AsUint8x32().StoreSlice(o[224:256])
		return
	}
	o := out[:128:128]
	c.pair(x0, x1, o[0:32])
	c.pair(x2, x3, o[32:64])
	c.pair(x4, x5, o[64:96])
	c.pair(x6, x7, o[96:128])
}

// laneOf[k] selects lane k into every lane (a permutation's indexes).
var laneOf = [8][8]uint32{
	{0, 0, 0, 0, 0, 0, 0, 0}, {1, 1, 1, 1, 1, 1, 1, 1}, {2, 2, 2, 2, 2, 2, 2, 2}, {3, 3, 3, 3, 3, 3, 3, 3},
	{4, 4, 4, 4, 4, 4, 4, 4}, {5, 5, 5, 5, 5, 5, 5, 5}, {6, 6, 6, 6, 6, 6, 6, 6}, {7, 7, 7, 7, 7, 7, 7, 7},
}

// nibbles8 returns the 8 signed 4-bit codes of lane k of w (low nibble
// first) as float32, as dequantizeGroup reads them.
func nibbles8(w archsimd.Uint32x8, k int, shifts, nib archsimd.Uint32x8) archsimd.Float32x8 {
	q := w.Permute(archsimd.LoadUint32x8(&laneOf[k])).ShiftRight(shifts).And(nib)
	return q.ShiftAllLeft(28).AsInt32x8().ShiftAllRight(28).ConvertToFloat32()
}

// dequantizeTensorSIMD is dequantizeTensor for float16 and bfloat16
// outputs through the vector units, 64 codes at a time: float32(q)·s and
// the rounding to the dtype, as the scalar path's tables compute them. It
// returns false, with dst partly written, when it does not apply or when a
// float16 reconstruction reached 65504, which the scalar path saturates:
// the caller then runs the scalar path, which rewrites all of dst.
func dequantizeTensorSIMD(codes []byte, scales []uint16, g int, dt safetensors.DType, dst []byte) bool {
	if !simdEnabled || (dt != safetensors.F16 && dt != safetensors.BF16) || g%32 != 0 || len(codes)%32 != 0 {
		return false
	}
	hc := newHalfConv(dt == safetensors.F16)
	shifts := archsimd.LoadUint32x8(&nibbleShifts)
	nib := archsimd.BroadcastUint32x8(0xf)
	for u := range len(codes) / 32 {
		// The scales of the unit's two halves (the same one unless g = 32).
		clearUpper() // scalar float code follows
		e := 64 * u
		s0 := archsimd.BroadcastFloat32x8(safetensors.F16ToF32(scales[e/g]))
		s1 := archsimd.BroadcastFloat32x8(safetensors.F16ToF32(scales[(e+32)/g]))
		w := archsimd.LoadUint8x32Slice(codes[32*u : 32*u+32]).AsUint32x8()
		o := dst[128*u : 128*u+128 : 128*u+128]
		hc.pair(nibbles8(w, 0, shifts, nib).Mul(s0), nibbles8(w, 1, shifts, nib).Mul(s0), o[0:32])
		hc.pair(nibbles8(w, 2, shifts, nib).Mul(s0), nibbles8(w, 3, shifts, nib).Mul(s0), o[32:64])
		hc.pair(nibbles8(w, 4, shifts, nib).Mul(s1), nibbles8(w, 5, shifts, nib).Mul(s1), o[64:96])
		hc.pair(nibbles8(w, 6, shifts, nib).Mul(s1), nibbles8(w, 7, shifts, nib).Mul(s1), o[96:128])
	}
	return hc.fits()
}
