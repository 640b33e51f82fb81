//go:build goexperiment.simd && amd64

package compression

import (
	"encoding/binary"
	"simd/archsimd"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// bitsWord returns the 8·bits bits of src that start at bit index at
// (LSB-first, as bitWriter packs them; zero past the end), in the low bits
// of a uint32: 8 codes of bits ≤ 4 bits.
func bitsWord(src []byte, at, bits int) uint32 {
	i, sh := at/8, at%8
	var v uint64
	if i+8 <= len(src) {
		v = binary.LittleEndian.Uint64(src[i:])
	} else {
		for k, b := range src[i:min(i+8, len(src))] {
			v |= uint64(b) << (8 * k)
		}
	}
	return uint32(v>>sh) & uint32(uint64(1)<<(8*bits)-1)
}

// codeLanes turns the 8 codes of word (bits each, LSB-first, as a uint32
// broadcast to every lane and shifted by shifts) into float32 code values:
// sign-extended for sym, as they are for asym.
type codeLanes struct {
	mask, up, down archsimd.Uint32x8 // the code's bits; the shifts that sign-extend it
	asym           bool
}

func newCodeLanes(spec codeSpec) codeLanes {
	return codeLanes{
		mask: archsimd.BroadcastUint32x8(1<<spec.bits - 1),
		up:   archsimd.BroadcastUint32x8(uint32(32 - spec.bits)), down: archsimd.BroadcastUint32x8(uint32(32 - spec.bits)),
		asym: spec.asym,
	}
}

// values returns float32(q)·s (+ mv for asym: a second rounding, never
// fused) for the codes of v (one code in the low bits of each lane).
func (c *codeLanes) values(v archsimd.Uint32x8, s, mv archsimd.Float32x8) archsimd.Float32x8 {
	q := v.And(c.mask)
	var f archsimd.Float32x8
	if c.asym {
		f = q.AsInt32x8().ConvertToFloat32().Mul(s).Add(mv)
	} else {
		f = q.ShiftLeft(c.up).AsInt32x8().ShiftRight(c.down.AsInt32x8()).ConvertToFloat32().Mul(s)
	}
	return f
}

// decodeRowsBits is decodeRowsSIMD for codes of 2, 3 or 4 bits of either
// scheme (job.spec), groups along the rows.
func decodeRowsBits(job *rowDecodeJob) bool {
	dim, g, spec := job.dim, job.group, job.spec
	width := job.dt.Bits() / 8
	rows := len(job.dst) / (dim * width)
	y := make([]float32, dim)
	hc := newHalfConv(job.dt == safetensors.F16)
	cl := newCodeLanes(spec)
	var shifts archsimd.Uint32x8
	{
		var sh [8]uint32
		for j := range sh {
			sh[j] = uint32(spec.bits * j)
		}
		shifts = archsimd.LoadUint32x8(&sh)
	}
	var bf butterflies
	if job.rot != nil {
		bf = newButterflies()
	}
	groupsRow := dim / g
	gBytes := g * spec.bits / 8
	for r := range rows {
		for k := range groupsRow {
			gi := r*groupsRow + k
			clearUpper() // scalar float code follows
			s, mv, ok := groupScaleMin(job, gi)
			if !ok {
				return false // corrupt: the scalar path names it
			}
			sv, mvv := archsimd.BroadcastFloat32x8(s), archsimd.BroadcastFloat32x8(mv)
			in := job.codes[gi*gBytes : (gi+1)*gBytes]
			yg := y[k*g : (k+1)*g]
			for i := 0; i < g; i += 8 {
				word := bitsWord(in, i*spec.bits, spec.bits)
				cl.values(archsimd.BroadcastUint32x8(word).ShiftRight(shifts), sv, mvv).StoreSlice(yg[i : i+8])
			}
		}
		out := job.dst[r*dim*width : (r+1)*dim*width]
		switch {
		case job.rot != nil && job.rot.n == 64:
			inverseEncode64(job.rot, &bf, y, job.dt, out, &hc)
		case job.rot != nil:
			rotateInverse(job.rot, &bf, y)
			fallthrough
		default:
			encodeRow(y, job.dt, out, &hc)
		}
	}
	return hc.fits()
}

// groupScaleMin reads group gi's scale (and minimum, asym) as float32; ok
// is false for a negative or non-finite scale or a non-finite minimum.
func groupScaleMin(job *rowDecodeJob, gi int) (s, mv float32, ok bool) {
	s16 := uint16(job.scales[2*gi]) | uint16(job.scales[2*gi+1])<<8
	if s16&0x7c00 == 0x7c00 || s16&0x8000 != 0 {
		return 0, 0, false
	}
	if job.spec.asym {
		m16 := uint16(job.mins[2*gi]) | uint16(job.mins[2*gi+1])<<8
		if m16&0x7c00 == 0x7c00 {
			return 0, 0, false
		}
		mv = safetensors.F16ToF32(m16)
	}
	return safetensors.F16ToF32(s16), mv, true
}

// decodeChannelsBits is decodeChannelsSIMD for codes of 2, 3 or 4 bits of
// either scheme: channel d's codes run over the keep positions from bit
// d·keep·bits.
func decodeChannelsBits(job *rowDecodeJob, keep int, y []float32) bool {
	dim, g, spec := job.dim, job.group, job.spec
	width := job.dt.Bits() / 8
	groupsRow := (keep + g - 1) / g
	hc := newHalfConv(job.dt == safetensors.F16)
	cl := newCodeLanes(spec)
	var words [8]uint32
	var scl, mins [8]float32
	// Code j's shift within a word, as vectors (see decodeChannelsSIMD).
	var shifts [8]archsimd.Uint32x8
	for j := range shifts {
		shifts[j] = archsimd.BroadcastUint32x8(uint32(spec.bits * j))
	}
	for cb := 0; cb < dim; cb += 8 {
		for k := range groupsRow {
			clearUpper() // scalar float code follows
			for l := range 8 {
				s, mv, ok := groupScaleMin(job, (cb+l)*groupsRow+k)
				if !ok {
					return false // corrupt: the scalar path names it
				}
				scl[l], mins[l] = s, mv
			}
			sv, mvv := archsimd.LoadFloat32x8(&scl), archsimd.LoadFloat32x8(&mins)
			for t0 := k * g; t0 < min((k+1)*g, keep); t0 += 8 {
				for l := range 8 {
					words[l] = bitsWord(job.codes, ((cb+l)*keep+t0)*spec.bits, spec.bits)
				}
				wv := archsimd.LoadUint32x8(&words)
				for t := t0; t < min(t0+8, keep); t++ {
					cl.values(wv.ShiftRight(shifts[t-t0]), sv, mvv).StoreSlice(y[t*dim+cb : t*dim+cb+8])
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
