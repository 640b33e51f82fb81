//go:build goexperiment.simd && amd64

package compression

import (
	"encoding/binary"
	"math"
	"simd/archsimd"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// This file holds the vector encoders: rows (groups along the last axis) and
// channels (per-channel keys, groups along the sequence), for the symmetric
// and asymmetric schemes at 2, 3 and 4 bits. Symmetric 4-bit groups along
// the last axis, the seed's scheme, keep a kernel of their own
// (quantizeGroup). Every code is the exact division of the general encoder,
// rounded half to even and clamped, so the bytes are the scalar encoders'.

// quantizeGroup writes the codes of group v (symmetric 4-bit, scale s > 0)
// into out (len(v)/2 bytes) and the codes' values, float32(q)·s, into y. The
// quotient is the exact division v/s, rounded half to even and clamped, as
// quantizeCode defines it.
//
// packed is scratch memory: a local array would be zeroed on every call with
// a legacy SSE store (see clearUpper), and the shift takes its count from a
// vector for the same reason.
func quantizeGroup(v []float32, s float32, out []byte, y []float32, packed *[4]uint64) {
	sv := archsimd.BroadcastFloat32x8(s)
	lo := archsimd.BroadcastFloat32x8(qmin)
	hi := archsimd.BroadcastFloat32x8(qmax)
	nib := archsimd.BroadcastInt32x8(0xf)
	fold := archsimd.BroadcastUint64x4(28)
	for i := 0; i < len(v); i += 8 {
		q := archsimd.LoadFloat32x8Slice(v[i : i+8]).Div(sv).RoundToEven().Max(lo).Min(hi)
		q.Mul(sv).StoreSlice(y[i : i+8])
		// Each 64-bit lane holds codes c0 (low half) and c1: c0 | c1<<4 is
		// its low byte after folding the high half down by 28 bits.
		w := q.ConvertToInt32().And(nib).AsUint64x4()
		w.Or(w.ShiftRight(fold)).Store(packed)
		o := out[i/2 : i/2+4 : i/2+4]
		o[0], o[1], o[2], o[3] = byte(packed[0]), byte(packed[1]), byte(packed[2]), byte(packed[3])
	}
}

// codeVec holds a codeSpec's constants as vectors, and scratch memory.
type codeVec struct {
	lo, hi archsimd.Float32x8
	mask   archsimd.Int32x8  // the low bits bits of a lane
	fold   archsimd.Uint64x4 // 32 − bits: folds the two codes of a 64-bit lane together
	bits   int
	pair   uint64 // the low 2·bits bits of a 64-bit lane
	asym   bool
	packed [4]uint64
}

func newCodeVec(c codeSpec) *codeVec {
	return &codeVec{
		lo: archsimd.BroadcastFloat32x8(float32(c.lo)), hi: archsimd.BroadcastFloat32x8(float32(c.hi)),
		mask: archsimd.BroadcastInt32x8(1<<c.bits - 1), fold: archsimd.BroadcastUint64x4(uint64(32 - c.bits)),
		bits: c.bits, pair: 1<<(2*c.bits) - 1, asym: c.asym,
	}
}

// copyVec copies src into dst (len a multiple of 8) with vector moves:
// copy's memmove uses legacy SSE instructions at these sizes (clearUpper).
func copyVec(dst, src []float32) {
	for i := 0; i+8 <= len(src); i += 8 {
		archsimd.LoadFloat32x8Slice(src[i : i+8]).StoreSlice(dst[i : i+8])
	}
}

// putCodes stores the low 8·n bits of v, little-endian, in out[:n] (n ≤ 4).
func putCodes(out []byte, v uint32, n int) {
	switch n {
	case 4:
		_ = out[3]
		out[0], out[1], out[2], out[3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
	case 3:
		_ = out[2]
		out[0], out[1], out[2] = byte(v), byte(v>>8), byte(v>>16)
	default:
		_ = out[1]
		out[0], out[1] = byte(v), byte(v>>8)
	}
}

// quantizeGroupBits writes the codes of group v (scale s > 0, minimum mv for
// asym) into out, packed LSB-first (len(v)·bits/8 bytes), and their values,
// float32(q)·s (+ mv for asym, a second rounding), into y. The code is the
// exact division (v − mv)/s, rounded half to even and clamped, as
// groupCodec.encode defines it.
func quantizeGroupBits(v []float32, s, mv float32, c *codeVec, out []byte, y []float32) {
	sv := archsimd.BroadcastFloat32x8(s)
	mvv := archsimd.BroadcastFloat32x8(mv)
	b := c.bits
	packed := &c.packed
	for i := 0; i < len(v); i += 8 {
		x := archsimd.LoadFloat32x8Slice(v[i : i+8])
		if c.asym {
			x = x.Sub(mvv)
		}
		q := x.Div(sv).RoundToEven().Max(c.lo).Min(c.hi)
		r := q.Mul(sv)
		if c.asym {
			r = r.Add(mvv)
		}
		r.StoreSlice(y[i : i+8])
		// As in quantizeGroup: fold each 64-bit lane's two codes together,
		// then join the four pairs.
		w := q.ConvertToInt32().And(c.mask).AsUint64x4()
		w.Or(w.ShiftRight(c.fold)).Store(packed)
		word := packed[0]&c.pair | (packed[1]&c.pair)<<(2*b) | (packed[2]&c.pair)<<(4*b) | (packed[3]&c.pair)<<(6*b)
		putCodes(out[i*b/8:], uint32(word), b)
	}
}

// groupMax returns the largest |v| of a group, as float32 bits.
func groupMax(v []float32) uint32 {
	absMask := archsimd.BroadcastUint32x8(0x7fffffff)
	var mx archsimd.Uint32x8
	for i := 0; i < len(v); i += 8 {
		mx = mx.Max(archsimd.LoadFloat32x8Slice(v[i : i+8]).AsUint32x8().And(absMask))
	}
	return maxLane(mx)
}

// groupMinMax returns the smallest and largest element of a group, and its
// largest magnitude as float32 bits (0x7f800000 or more: not all finite).
func groupMinMax(v []float32) (mn, mx float32, maxBits uint32) {
	absMask := archsimd.BroadcastUint32x8(0x7fffffff)
	lo := archsimd.LoadFloat32x8Slice(v[:8])
	hi := lo
	var mb archsimd.Uint32x8
	for i := 0; i < len(v); i += 8 {
		x := archsimd.LoadFloat32x8Slice(v[i : i+8])
		lo, hi = lo.Min(x), hi.Max(x)
		mb = mb.Max(x.AsUint32x8().And(absMask))
	}
	// Reduced in registers (no zeroed local arrays, see clearUpper). Lane
	// minima and maxima of equal value may differ in the sign of a zero,
	// which scaleOf normalises.
	for _, p := range []*[8]uint32{&permH4, &permH2, &permH1} {
		perm := archsimd.LoadUint32x8(p)
		lo, hi = lo.Min(lo.Permute(perm)), hi.Max(hi.Permute(perm))
	}
	mn, mx = lo.GetLo().GetElem(0), hi.GetLo().GetElem(0)
	maxBits = maxLane(mb) // clears the upper halves before the scalar code
	return mn, mx, maxBits
}

// scaleOf returns the float16 scale and minimum (0 for sym) of a group whose
// largest magnitude is the float32 with bits mb (sym), or whose extremes are
// mn and mx (asym), exactly as groupCodec.encode computes them. ok is false
// where the scalar path must take over and report: a scale or minimum that
// overflows float16.
func scaleOf(c codeSpec, mb uint32, mn, mx float32) (s16, m16 uint16, ok bool) {
	if !c.asym {
		s16 = safetensors.F32ToF16(math.Float32frombits(mb) / c.div)
		return s16, 0, s16 != 0x7c00
	}
	// A zero extreme is normalised to +0, as the scalar encoder does.
	mn += 0
	mx += 0
	s16, m16 = safetensors.F32ToF16((mx-mn)/c.div), safetensors.F32ToF16(mn)
	return s16, m16, s16&0x7c00 != 0x7c00 && m16&0x7c00 != 0x7c00
}

func encodeRowsSIMD(job *rowJob, st *tensorStats) bool {
	dim, g, spec := job.dim, job.group, job.spec
	width := job.dt.Bits() / 8
	rows := len(job.src) / (dim * width)
	x := make([]float32, dim) // the row as read; the reconstruction when measured rotated
	w := make([]float32, dim) // rotated, then (or else) the reconstruction
	var bf butterflies
	if job.rot != nil {
		bf = newButterflies()
	}
	cv := newCodeVec(spec)
	seed := !spec.asym && spec.bits == 4
	var packed [4]uint64
	rotated := job.rot != nil && job.rotated
	var limit uint32
	if rotated {
		limit = math.Float32bits(rotatedMetricsLimit(job.dt, job.rot.n))
	}
	gBytes := g * spec.bits / 8
	var sums errorSums
	groupsRow := dim / g
	fused := job.rot != nil && job.rot.n == 64 && job.dt == safetensors.F16 // decoded and rotated in one pass
	var inMax archsimd.Uint32x8                                             // the input's largest magnitude, when fused
	var yMax archsimd.Uint32x8                                              // the largest value measured in registers
	inRegisters := seed && job.rot == nil                                   // the seed's scheme: measured group by group
	for r := range rows {
		in := job.src[r*dim*width : (r+1)*dim*width]
		if fused {
			decodeRotate64(job.rot, &bf, in, w, &inMax)
			clearUpper() // scalar code follows
		} else if !decodeRow(in, job.dt, x) {
			return false
		}
		v, y := x, w
		if job.rot != nil {
			if !fused {
				rotateForward(job.rot, &bf, w, x)
			}
			v = w
			if rotated {
				y = x // the row as read is no longer needed
			}
		}
		for k := range groupsRow {
			gi := r*groupsRow + k
			grp := v[k*g : (k+1)*g : (k+1)*g]
			var mb uint32
			var mn, mx float32
			if spec.asym {
				mn, mx, mb = groupMinMax(grp)
			} else {
				mb = groupMax(grp)
			}
			if mb >= 0x7f800000 {
				return false // the rotation overflowed: the scalar path reports it
			}
			if rotated && mb >= limit {
				return false // measured in the original basis: the scalar path does it
			}
			s16, m16, ok := scaleOf(spec, mb, mn, mx)
			if !ok {
				return false // the scalar path reports the overflow
			}
			job.scales[2*gi], job.scales[2*gi+1] = byte(s16), byte(s16>>8)
			if spec.asym {
				job.mins[2*gi], job.mins[2*gi+1] = byte(m16), byte(m16>>8)
			}
			out := job.codes[gi*gBytes : (gi+1)*gBytes]
			yg := y[k*g : (k+1)*g]
			s, mv := safetensors.F16ToF32(s16), safetensors.F16ToF32(m16)
			switch {
			case s == 0: // every code 0, every value the minimum (0 for sym)
				clear(out)
				for i := range yg {
					yg[i] = mv
				}
				if inRegisters && !sums.add(grp, yg, job.dt) { // measured here, as the others
					return false
				}
			case seed && rotated: // measured while in registers: no values stored
				quantizeGroupMeasured(grp, s, out, &packed, &sums, safetensors.F32, &yMax)
				continue
			case seed && job.rot == nil: // the same, each value rounded to the stored dtype
				quantizeGroupMeasured(grp, s, out, &packed, &sums, job.dt, &yMax)
				continue
			case seed:
				quantizeGroup(grp, s, out, yg, &packed)
			default:
				quantizeGroupBits(grp, s, mv, cv, out, yg)
			}
			if rotated {
				sums.add(grp, yg, safetensors.F32) // rotated input against its reconstruction
			}
		}
		switch {
		case rotated: // measured group by group above
		case inRegisters: // likewise
		case job.rot != nil:
			if fused {
				decodeRow(in, job.dt, x) // the row as read, to measure against
			}
			rotateInverse(job.rot, &bf, w)
			fallthrough
		default:
			if !sums.add(x, w, job.dt) {
				return false
			}
		}
	}
	sums.flush(st)
	if !roundedFits(yMax) {
		return false // the scalar path measures what the shortcut cannot
	}
	return !fused || finiteBits(inMax)
}

func encodeChannelsSIMD(job *channelJob, st *tensorStats) bool {
	dim, keep, g, spec := job.dim, job.keep, job.group, job.spec
	width := job.dt.Bits() / 8
	groupsRow := (keep + g - 1) / g
	// One group of positions at a time (g rows, a few KiB), so the block
	// stays in cache: decode and rotate its rows, quantize each channel,
	// then measure (after undoing the rotation unless measured rotated).
	x := job.x[:g*dim] // the rows as read; the reconstruction when measured rotated
	w := job.w[:g*dim] // rotated, then (or else) the reconstruction
	var bf butterflies
	if job.rot != nil {
		bf = newButterflies()
	}
	rotated := job.rot != nil && job.rotated
	var limit uint32
	if rotated {
		limit = math.Float32bits(rotatedMetricsLimit(job.dt, job.rot.n))
	}
	// Each lane packs its channel's codes, 8 positions to a word of bits
	// bytes, LSB first; col holds every channel's packed stream, (keep+7)/8
	// words each, until they are copied to their bit offsets at the end.
	bits := spec.bits
	wordsPer := (keep + 7) / 8
	bytesPer := wordsPer * bits
	col := job.packed[:dim*bytesPer]
	absMask := archsimd.BroadcastUint32x8(0x7fffffff)
	mask := archsimd.BroadcastUint32x8(1<<bits - 1)
	lo := archsimd.BroadcastFloat32x8(float32(spec.lo))
	hi := archsimd.BroadcastFloat32x8(float32(spec.hi))
	var mx, words [8]uint32
	var mnL, mxL, div, live, mins [8]float32
	// The shift of each position's codes within its word, as vectors (a
	// shift by a scalar count would load it with a legacy SSE move).
	var shifts [8]archsimd.Uint32x8
	for i := range shifts {
		shifts[i] = archsimd.BroadcastUint32x8(uint32(bits * i))
	}
	var sums errorSums
	fused := job.rot != nil && job.rot.n == 64 && job.dt == safetensors.F16 // decoded and rotated in one pass
	var inMax archsimd.Uint32x8                                             // the input's largest magnitude, when fused
	for k := range groupsRow {
		t0, t1 := k*g, min((k+1)*g, keep)
		n := (t1 - t0) * dim
		for t := t0; t < t1; t++ {
			r := (t - t0) * dim
			in := job.src[t*dim*width : (t+1)*dim*width]
			switch {
			case fused:
				decodeRotate64(job.rot, &bf, in, w[r:r+dim], &inMax)
				if !rotated {
					decodeRow(in, job.dt, x[r:r+dim]) // the row as read, to measure against
				}
			case !decodeRow(in, job.dt, x[r:r+dim]):
				return false
			case job.rot != nil:
				rotateForward(job.rot, &bf, w[r:r+dim], x[r:r+dim])
			default:
				copyVec(w[r:r+dim], x[r:r+dim])
			}
		}
		y := w
		if rotated {
			y = x
		}
		for cb := 0; cb < dim; cb += 8 {
			var m archsimd.Uint32x8
			var vmn, vmx archsimd.Float32x8
			if spec.asym {
				vmn = archsimd.LoadFloat32x8Slice(w[cb : cb+8])
				vmx = vmn
			}
			for r := cb; r < n; r += dim {
				v := archsimd.LoadFloat32x8Slice(w[r : r+8])
				m = m.Max(v.AsUint32x8().And(absMask))
				if spec.asym {
					vmn, vmx = vmn.Min(v), vmx.Max(v)
				}
			}
			m.Store(&mx)
			vmn.Store(&mnL)
			vmx.Store(&mxL)
			clearUpper() // scalar float code follows
			for l := range 8 {
				if mx[l] >= 0x7f800000 {
					return false // the rotation overflowed: the scalar path reports it
				}
				if rotated && mx[l] >= limit {
					return false // measured in the original basis: the scalar path does it
				}
				s16, m16, ok := scaleOf(spec, mx[l], mnL[l], mxL[l])
				if !ok {
					return false // the scalar path reports the overflow
				}
				gi := (cb+l)*groupsRow + k
				job.scales[2*gi], job.scales[2*gi+1] = byte(s16), byte(s16>>8)
				if spec.asym {
					job.mins[2*gi], job.mins[2*gi+1] = byte(m16), byte(m16>>8)
				}
				// A zero scale gives code 0: divide by 1, then zero the lane.
				div[l], live[l], mins[l] = safetensors.F16ToF32(s16), 1, safetensors.F16ToF32(m16)
				if div[l] == 0 {
					div[l], live[l] = 1, 0
				}
			}
			sv, lv, mvv := archsimd.LoadFloat32x8(&div), archsimd.LoadFloat32x8(&live), archsimd.LoadFloat32x8(&mins)
			var acc archsimd.Uint32x8
			// Measured in the rotated basis, the error is summed here, in
			// registers, and the values are not stored.
			var exx, eee, eyy archsimd.Float32x8
			var eme archsimd.Uint32x8
			for t := t0; t < t1; t++ {
				at := (t-t0)*dim + cb
				v0 := archsimd.LoadFloat32x8Slice(w[at : at+8])
				v := v0
				if spec.asym {
					v = v.Sub(mvv)
				}
				q := v.Div(sv).RoundToEven().Max(lo).Min(hi).Mul(lv)
				rec := q.Mul(sv)
				if spec.asym {
					rec = rec.Add(mvv)
				}
				if rotated {
					e := v0.Sub(rec)
					exx = exx.Add(v0.Mul(v0))
					eee = eee.Add(e.Mul(e))
					eyy = eyy.Add(rec.Mul(rec))
					eme = eme.Max(e.AsUint32x8().And(absMask))
				} else {
					rec.StoreSlice(y[at : at+8])
				}
				acc = acc.Or(q.ConvertToInt32().AsUint32x8().And(mask).ShiftLeft(shifts[t%8]))
				if t%8 == 7 || t == t1-1 {
					acc.Store(&words)
					if bits == 4 { // one 32-bit store a lane, inlined
						for l := range 8 { // not range words: that copies the array with SSE moves
							binary.LittleEndian.PutUint32(col[(cb+l)*bytesPer+(t/8)*4:], words[l])
						}
					} else {
						for l := range 8 {
							putCodes(col[(cb+l)*bytesPer+(t/8)*bits:], words[l], bits)
						}
					}
					acc = archsimd.Uint32x8{}
				}
			}
			if rotated {
				sums.merge(exx, eee, eyy, eme, 8*(t1-t0))
			}
		}
		for r := 0; r < n && !rotated; r += dim { // rotated: measured above
			yr := w[r : r+dim]
			if job.rot != nil {
				rotateInverse(job.rot, &bf, yr)
			}
			if !sums.add(x[r:r+dim], yr, job.dt) {
				return false
			}
		}
	}
	sums.flush(st)
	if fused && !finiteBits(inMax) {
		return false // the scalar path names the value
	}
	clear(job.codes)
	for d := range dim {
		if bits == 4 {
			packNibbles(job.codes, d*keep, col[d*bytesPer:], keep)
		} else {
			packBits(job.codes, d*keep*bits, col[d*bytesPer:], keep*bits)
		}
	}
	return true
}
