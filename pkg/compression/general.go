package compression

import (
	"encoding/binary"
	"fmt"
	"math"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// This file holds the general encoder and decoder: any scheme, code width,
// grouping axis, rotation and sink. The version-1 scheme (sym, 4 bits, last
// axis, no rotation, no sink) also has a tuned path in quantize.go; tests
// check that both give identical bytes.

// bitWriter packs codes LSB-first: code i occupies bits [i·b, (i+1)·b) of the stream.
type bitWriter struct {
	out  []byte
	acc  uint64
	nacc uint
}

func (w *bitWriter) put(v uint32, bits uint) {
	w.acc |= uint64(v) << w.nacc
	w.nacc += bits
	for w.nacc >= 8 {
		w.out = append(w.out, byte(w.acc))
		w.acc >>= 8
		w.nacc -= 8
	}
}

func (w *bitWriter) flush() []byte {
	if w.nacc > 0 {
		w.out = append(w.out, byte(w.acc))
		w.acc, w.nacc = 0, 0
	}
	return w.out
}

// bitReader reads codes written by bitWriter.
type bitReader struct {
	in   []byte
	pos  int
	acc  uint64
	nacc uint
}

func (r *bitReader) get(bits uint) uint32 {
	for r.nacc < bits {
		r.acc |= uint64(r.in[r.pos]) << r.nacc
		r.pos++
		r.nacc += 8
	}
	v := uint32(r.acc & (1<<bits - 1))
	r.acc >>= bits
	r.nacc -= bits
	return v
}

// groupCodec quantizes and reconstructs single groups for one scheme and width.
type groupCodec struct {
	asym   bool
	signed bool // sym: two's complement codes
	bits   uint
	lo, hi int32
	div    float32
	nf     *nfTable // scheme nf: its levels (nonuniform.go)
}

func newGroupCodec(p tensorPlan) groupCodec {
	lo, hi, _ := levels(p.Scheme, p.Bits)
	c := groupCodec{asym: p.Scheme == SchemeAsym, signed: p.Scheme == SchemeSym, bits: uint(p.Bits), lo: lo, hi: hi, div: p.divisor()}
	if t, ok := nfTables[p.Bits]; ok && p.Scheme == SchemeNF {
		c.nf = &t
	}
	return c
}

// encode writes the codes of group v and returns its float16 scale and minimum
// (0 for sym), and writes the group's reconstruction (before rounding to the
// tensor's dtype) into deq.
func (c groupCodec) encode(v []float32, w *bitWriter, deq []float32) (s16, m16 uint16, err error) {
	if c.nf != nil {
		return c.encodeNF(v, w, deq)
	}
	var s, mv float32
	if c.asym {
		// Plain comparisons: the min and max builtins also order NaN and
		// signed zeros, which costs a lot here and is not needed (NaN was
		// refused). A zero minimum or maximum is normalised to +0, so the
		// float16 bits do not depend on the order of the elements, and a
		// group of zeros gets scale +0, never −0 (which decoders refuse).
		mn, mx := v[0], v[0]
		for _, x := range v[1:] {
			if x < mn {
				mn = x
			}
			if x > mx {
				mx = x
			}
		}
		mn += 0
		mx += 0
		s16, m16 = safetensors.F32ToF16((mx-mn)/c.div), safetensors.F32ToF16(mn)
		if s16&0x7c00 == 0x7c00 || m16&0x7c00 == 0x7c00 {
			return 0, 0, fmt.Errorf("%w (group min %g, max %g)", ErrScaleOverflow, mn, mx)
		}
		mv = safetensors.F16ToF32(m16)
	} else {
		var mb uint32 // max |x| as bits: non-negative floats order like their bits
		for _, x := range v {
			mb = max(mb, math.Float32bits(x)&0x7fffffff)
		}
		m := math.Float32frombits(mb)
		s16 = safetensors.F32ToF16(m / c.div)
		if s16 == 0x7c00 {
			return 0, 0, fmt.Errorf("%w (group max |x| = %g)", ErrScaleOverflow, m)
		}
	}
	s = safetensors.F16ToF32(s16)
	mask := uint32(1)<<c.bits - 1
	if s == 0 {
		for i := range v {
			w.put(0, c.bits)
			deq[i] = c.value(0, 0, mv)
		}
		return s16, m16, nil
	}
	inv := 1 / s
	lo, hi := float32(c.lo)-1, float32(c.hi)+1
	sub := float32(0)
	if c.asym {
		sub = mv // x − 0 is exact, so sym shares the loop
	}
	for i, x := range v {
		x -= sub
		// As in the tuned path: multiply by the reciprocal, and use the
		// defining division only near a tie, where the two could disagree.
		t := clampF(x*inv, lo, hi)
		r := (t + roundMagic) - roundMagic
		if f := t - r; f*f > tieGuard*tieGuard {
			r = roundHalfEven(clampF(x/s, lo, hi))
		}
		q := int32(r)
		if q > c.hi {
			q = c.hi
		} else if q < c.lo {
			q = c.lo
		}
		w.put(uint32(q)&mask, c.bits)
		y := float32(q) * s
		if c.asym {
			y = float32(y) + mv
		}
		deq[i] = y
	}
	return s16, m16, nil
}

// clampF limits v to [lo, hi] with plain comparisons (v is never NaN here).
func clampF(v, lo, hi float32) float32 {
	if v > hi {
		return hi
	}
	if v < lo {
		return lo
	}
	return v
}

// value reconstructs one code: float32(q)·s, plus the minimum for asym (two
// roundings, never fused); for nf float32(level·s), a zero made +0.
func (c groupCodec) value(q int32, s, mv float32) float32 {
	if c.nf != nil {
		return float32(c.nf.levels[q]*s) + 0
	}
	y := float32(q) * s
	if c.asym {
		y = float32(y) + mv
	}
	return y
}

// decode reads len(deq) codes and writes their reconstruction.
func (c groupCodec) decode(r *bitReader, s, mv float32, deq []float32) {
	if c.bits == 4 && r.nacc == 0 && len(deq)%2 == 0 {
		// Byte-aligned 4-bit group: two codes per byte, low nibble first,
		// through a 16-entry table of reconstructions.
		var lut [16]float32
		for u := range lut {
			q := int32(u)
			if c.signed {
				q = int32(uint32(u)<<28) >> 28
			}
			lut[u] = c.value(q, s, mv)
		}
		in := r.in[r.pos : r.pos+len(deq)/2]
		for j, b := range in {
			deq[2*j], deq[2*j+1] = lut[b&0xf], lut[b>>4]
		}
		r.pos += len(in)
		return
	}
	if (c.bits == 2 || c.bits == 3) && r.nacc == 0 && len(deq)%8 == 0 {
		// Byte-aligned 2- or 3-bit group: 8 codes in bits bytes at a time,
		// through a table of the 4 or 8 reconstructions.
		var lut [8]float32
		shift := 32 - c.bits
		for u := range 1 << c.bits {
			q := int32(u)
			if c.signed {
				q = int32(uint32(u)<<shift) >> shift
			}
			lut[u] = c.value(q, s, mv)
		}
		b := int(c.bits)
		in := r.in[r.pos : r.pos+len(deq)*b/8]
		for k := 0; k < len(deq); k += 8 {
			o := in[k*b/8 : k*b/8+b]
			v := uint32(o[0]) | uint32(o[1])<<8
			if b == 3 {
				v |= uint32(o[2]) << 16
			}
			d := deq[k : k+8 : k+8]
			for j := range d {
				d[j] = lut[(v>>(c.bits*uint(j)))&(1<<c.bits-1)]
			}
		}
		r.pos += len(in)
		return
	}
	shift := 32 - c.bits
	for i := range deq {
		u := r.get(c.bits)
		q := int32(u)
		if c.signed {
			q = int32(u<<shift) >> shift // sign-extend
		}
		deq[i] = c.value(q, s, mv)
	}
}

// rotations caches the rotation of each block length.
var rotations = map[int]*rotation{}

func rotationFor(dim int) *rotation {
	n := hadamardBlock(dim)
	if r, ok := rotations[n]; ok {
		return r
	}
	return newRotation(n)
}

func init() {
	for n := 1; n <= 1<<14; n *= 2 {
		rotations[n] = newRotation(n)
	}
}

// generalScratch is reusable working memory of the general path.
type generalScratch struct {
	x, w, t, deq, mags []float32
	packed             []byte
	// The raw payloads of encodeVectorRows, reused from tensor to tensor:
	// the payload encoder copies what it keeps, so nothing outlives the
	// next tensor.
	codes, scales, mins, sink []byte
}

// zeroed returns *buf resized to n bytes, all zero, reusing its memory.
func zeroed(buf *[]byte, n int) []byte {
	*buf = grow(*buf, n)
	clear(*buf)
	return *buf
}

// toLayout copies the region w ([outer, keep, dim], row-major) into dst in
// the plan's row order: unchanged for the last axis, each outer block
// transposed to [dim, keep] for the sequence axis. fromLayout undoes it.
func toLayout(l layout, axis string, w, dst []float32) []float32 {
	if axis != AxisSeq {
		return w
	}
	transposeBlocks(w, dst, l.outer, l.keep, l.dim)
	return dst
}

func fromLayout(l layout, axis string, v, dst []float32) []float32 {
	if axis != AxisSeq {
		return v
	}
	transposeBlocks(v, dst, l.outer, l.dim, l.keep)
	return dst
}

// transposeBlocks transposes each of the outer [rows, cols] blocks of src into dst.
func transposeBlocks(src, dst []float32, outer, rows, cols int) {
	n := rows * cols
	for o := range outer {
		in, out := src[o*n:(o+1)*n], dst[o*n:(o+1)*n]
		for r := range rows {
			for c := range cols {
				out[c*rows+r] = in[r*cols+c]
			}
		}
	}
}

// generalEncoding is the raw (not yet entropy-coded) payloads of one
// tensor. The vector encoder leaves them in its generalScratch: they are
// valid until the next tensor is encoded with the same scratch.
type generalEncoding struct {
	codes, scales, mins, sink []byte
	stats                     tensorStats
}

// encodeGeneral quantizes t with plan p and measures the reconstruction.
func encodeGeneral(t *safetensors.Tensor, p tensorPlan, sparsity float64, ws *generalScratch) (generalEncoding, error) {
	if sparsity == 0 && vectorWidth(p.Bits) {
		if enc, ok := encodeVectorRows(t, p, ws); ok {
			return enc, nil
		}
	}
	var enc generalEncoding
	n := int(t.NumElements())
	width := t.DType.Bits() / 8
	l := p.layout(t.Shape)
	ws.x = grow(ws.x, n)
	if err := safetensors.DecodeFloat32(t.DType, t.Data, ws.x); err != nil {
		return enc, err
	}
	x := ws.x
	for i, v := range x {
		if math.Float32bits(v)&0x7fffffff >= 0x7f800000 {
			return enc, fmt.Errorf("%w (element %d)", ErrNonFinite, i)
		}
	}
	seqBytes := l.seq * l.dim * width
	if p.Sink > 0 {
		rowBytes := p.Sink * l.dim * width
		enc.sink = make([]byte, l.outer*rowBytes)
		for o := range l.outer {
			copy(enc.sink[o*rowBytes:(o+1)*rowBytes], t.Data[o*seqBytes:o*seqBytes+rowBytes])
		}
	}
	q := l.quantized()
	ws.w = grow(ws.w, q)
	for o := range l.outer {
		copy(ws.w[o*l.keep*l.dim:(o+1)*l.keep*l.dim], x[(o*l.seq+p.Sink)*l.dim:(o+1)*l.seq*l.dim])
	}
	if sparsity > 0 {
		ws.mags = grow(ws.mags, q)
		sparsify(ws.w, sparsity, ws.mags)
	}
	var rot *rotation
	if p.Rotate == RotateHadamard {
		rot = rotationFor(l.dim)
		for r := 0; r < l.outer*l.keep; r++ {
			row := ws.w[r*l.dim : (r+1)*l.dim]
			rot.forward(row)
			for _, v := range row {
				if math.Float32bits(v)&0x7fffffff >= 0x7f800000 {
					return enc, errRotationOverflow
				}
			}
		}
	}
	ws.t = grow(ws.t, q)
	rows := toLayout(l, p.Axis, ws.w, ws.t)
	ws.deq = grow(ws.deq, q)
	gc := newGroupCodec(p)
	bw := bitWriter{out: make([]byte, 0, (q*p.Bits+7)/8)}
	enc.scales = make([]byte, 2*l.groups())
	if gc.asym {
		enc.mins = make([]byte, 2*l.groups())
	}
	gi := 0
	for r := range l.rows {
		for g0 := 0; g0 < l.rowLen; g0 += p.Group {
			a, b := r*l.rowLen+g0, r*l.rowLen+min(g0+p.Group, l.rowLen)
			s16, m16, err := gc.encode(rows[a:b], &bw, ws.deq[a:b])
			if err != nil {
				return enc, fmt.Errorf("%w, group %d", err, gi)
			}
			binary.LittleEndian.PutUint16(enc.scales[2*gi:], s16)
			if gc.asym {
				binary.LittleEndian.PutUint16(enc.mins[2*gi:], m16)
			}
			gi++
		}
	}
	enc.codes = bw.flush()
	if p.rotatedMetrics(t.DType, sparsity) && maxMagnitude(rows[:q]) < rotatedMetricsLimit(t.DType, rot.n) {
		enc.stats = rotatedStats(x, rows, ws.deq, l, p.Sink)
		return enc, nil
	}
	// Reconstruct as the decoder will, then measure against the original.
	y := fromLayout(l, p.Axis, ws.deq, ws.w)
	if rot != nil {
		for r := 0; r < l.outer*l.keep; r++ {
			rot.inverse(y[r*l.dim : (r+1)*l.dim])
		}
	}
	var gs groupStats
	round := t.DType == safetensors.F16 || t.DType == safetensors.BF16
	for o := range l.outer {
		enc.stats.addExact(x[o*l.seq*l.dim : (o*l.seq+p.Sink)*l.dim])
		region := y[o*l.keep*l.dim : (o+1)*l.keep*l.dim]
		orig := x[(o*l.seq+p.Sink)*l.dim : (o+1)*l.seq*l.dim]
		orig = orig[:len(region):len(region)]
		for i, v := range region {
			if round {
				v = safetensors.RoundTo(t.DType, saturate(t.DType, v))
			}
			gs.add(orig[i], v)
			if i%64 == 63 { // flush float32 partial sums often enough to stay accurate
				enc.stats.addGroup(&gs, 0)
				gs = groupStats{maxErr: gs.maxErr}
			}
		}
	}
	enc.stats.addGroup(&gs, 0)
	enc.stats.n = int64(n)
	return enc, nil
}

// maxMagnitude returns the largest |v| of v (NaN and Inf were refused).
func maxMagnitude(v []float32) float32 {
	var mb uint32
	for _, x := range v {
		mb = max(mb, math.Float32bits(x)&0x7fffffff)
	}
	return math.Float32frombits(mb)
}

// rotatedStats measures a rotated tensor's error in the rotated basis
// (tensorPlan.rotatedMetrics): rot holds the rotated values in the plan's row
// order and deq their reconstruction in the same order; the sink positions of
// x, kept exact, add their energy and no error.
func rotatedStats(x, rot, deq []float32, l layout, sink int) tensorStats {
	var st tensorStats
	var gs groupStats
	add := func(a, b []float32) {
		b = b[:len(a):len(a)]
		for i, v := range a {
			gs.add(v, b[i])
			if i%64 == 63 { // flush float32 partial sums often enough to stay accurate
				st.addGroup(&gs, 0)
				gs = groupStats{maxErr: gs.maxErr}
			}
		}
		st.addGroup(&gs, 0)
		gs = groupStats{maxErr: gs.maxErr}
	}
	for o := range l.outer {
		st.addExact(x[o*l.seq*l.dim : (o*l.seq+sink)*l.dim]) // in float64: a sink may hold values near float32's limit
	}
	q := l.quantized()
	add(rot[:q], deq[:q])
	st.n = int64(l.outer * l.seq * l.dim)
	return st
}

// errRotationOverflow is the error for a row whose rotation left float32's
// range: finite inputs near 3.4e38 can sum to Inf, and Inf − Inf gives NaN.
var errRotationOverflow = fmt.Errorf("%w: the Hadamard rotation of a row leaves float32's range; use --rotate none", ErrScaleOverflow)

// vectorPlan returns the rotation of a plan and whether the vector encoders
// and decoders take tensors of this dtype and layout (the code width aside).
func vectorPlan(p tensorPlan, dt safetensors.DType, l layout) (*rotation, bool) {
	if p.Scheme == SchemeNF {
		return nil, false // scalar code only (nonuniform.go)
	}
	var rot *rotation
	if p.Rotate == RotateHadamard {
		rot = rotationFor(l.dim)
	}
	group := p.Group
	if p.Axis == AxisSeq {
		group = 8 // groups run along the sequence; rows only need vectors of 8 channels
	}
	return rot, rowsSupported(dt, l.dim, group, rot)
}

// encodeVectorRows is encodeGeneral through the vector encoders (2, 3 or
// 4-bit codes, either scheme, no sparsity): rows for groups along the last
// axis, channels for per-channel keys. It returns false, having written
// nothing the caller keeps, when the vector encoder declines.
func encodeVectorRows(t *safetensors.Tensor, p tensorPlan, ws *generalScratch) (generalEncoding, bool) {
	var enc generalEncoding
	l := p.layout(t.Shape)
	rot, ok := vectorPlan(p, t.DType, l)
	if !ok {
		return enc, false
	}
	spec := specOf(p)
	rotated := p.rotatedMetrics(t.DType, 0)
	width := t.DType.Bits() / 8
	seqBytes, sinkBytes := l.seq*l.dim*width, p.Sink*l.dim*width
	_, scalesPer := l.perOuter()
	codesPer := l.keep * l.dim * p.Bits / 8 // dim is a multiple of 8: whole bytes
	enc.codes = zeroed(&ws.codes, l.outer*codesPer)
	enc.scales = zeroed(&ws.scales, l.outer*scalesPer)
	if spec.asym && l.groups() > 0 { // no groups: no minimums, as the index rules say
		enc.mins = zeroed(&ws.mins, l.outer*scalesPer)
	}
	if p.Sink > 0 {
		enc.sink = zeroed(&ws.sink, l.outer*sinkBytes)
		ws.x = grow(ws.x, p.Sink*l.dim)
	}
	for o := range l.outer {
		base := o * seqBytes
		if p.Sink > 0 {
			// Positions kept exact: stored as they are, error zero.
			sink := t.Data[base : base+sinkBytes]
			copy(enc.sink[o*sinkBytes:], sink)
			if safetensors.DecodeFloat32(t.DType, sink, ws.x) != nil {
				return enc, false
			}
			for _, v := range ws.x {
				if math.Float32bits(v)&0x7fffffff >= 0x7f800000 {
					return enc, false
				}
			}
			enc.stats.addExact(ws.x)
		}
		src := t.Data[base+sinkBytes : base+seqBytes]
		codes, scales := enc.codes[o*codesPer:(o+1)*codesPer], enc.scales[o*scalesPer:(o+1)*scalesPer]
		var mins []byte
		if enc.mins != nil {
			mins = enc.mins[o*scalesPer : (o+1)*scalesPer]
		}
		if p.Axis == AxisSeq {
			ws.t, ws.deq = grow(ws.t, p.Group*l.dim), grow(ws.deq, p.Group*l.dim)
			ws.packed = grow(ws.packed, 4*l.dim*((l.keep+7)/8))
			job := channelJob{src: src, dt: t.DType, dim: l.dim, keep: l.keep, group: p.Group, rot: rot, codes: codes, scales: scales,
				mins: mins, spec: spec, rotated: rotated, x: ws.t, w: ws.deq, packed: ws.packed}
			ok = encodeChannels(job, &enc.stats)
		} else {
			ok = encodeRows(rowJob{src: src, dt: t.DType, dim: l.dim, group: p.Group, rot: rot, codes: codes, scales: scales,
				mins: mins, spec: spec, rotated: rotated}, &enc.stats)
		}
		if !ok {
			return enc, false
		}
	}
	return enc, true
}

// decodeGeneral rebuilds a tensor's bytes from its raw payloads.
func decodeGeneral(e *Entry, p tensorPlan, codes, scales, mins, sink []byte, dst []byte, ws *generalScratch) error {
	if vectorWidth(p.Bits) && decodeVectorRows(e, p, codes, scales, mins, sink, dst, ws) {
		return nil
	}
	dt := safetensors.DType(e.DType)
	width := dt.Bits() / 8
	l := p.layout(e.Shape)
	q := l.quantized()
	ws.deq = grow(ws.deq, q)
	gc := newGroupCodec(p)
	br := bitReader{in: codes}
	gi := 0
	for r := range l.rows {
		for g0 := 0; g0 < l.rowLen; g0 += p.Group {
			a, b := r*l.rowLen+g0, r*l.rowLen+min(g0+p.Group, l.rowLen)
			s16 := binary.LittleEndian.Uint16(scales[2*gi:])
			if s16&0x7c00 == 0x7c00 || s16&0x8000 != 0 {
				return fmt.Errorf("%w: scale %d is negative or not finite", ErrCorrupt, gi)
			}
			var mv float32
			if gc.asym {
				m16 := binary.LittleEndian.Uint16(mins[2*gi:])
				if m16&0x7c00 == 0x7c00 {
					return fmt.Errorf("%w: minimum %d is not finite", ErrCorrupt, gi)
				}
				mv = safetensors.F16ToF32(m16)
			}
			gc.decode(&br, safetensors.F16ToF32(s16), mv, ws.deq[a:b])
			gi++
		}
	}
	ws.w = grow(ws.w, q)
	y := fromLayout(l, p.Axis, ws.deq, ws.w)
	if p.Rotate == RotateHadamard {
		rot := rotationFor(l.dim)
		for r := 0; r < l.outer*l.keep; r++ {
			rot.inverse(y[r*l.dim : (r+1)*l.dim])
		}
	}
	seqBytes := l.seq * l.dim * width
	sinkBytes := p.Sink * l.dim * width
	saturateAll(dt, y)
	for o := range l.outer {
		base := o * seqBytes
		copy(dst[base:base+sinkBytes], sink[o*sinkBytes:(o+1)*sinkBytes])
		if err := safetensors.EncodeFloat32(dt, y[o*l.keep*l.dim:(o+1)*l.keep*l.dim], dst[base+sinkBytes:base+seqBytes]); err != nil {
			return err
		}
	}
	return nil
}

// decodeVectorRows is decodeGeneral for 2, 3 or 4-bit groups of either
// scheme through the vector decoders (rows, or channels for per-channel
// keys). It returns false when they decline; decodeGeneral then rewrites
// all of dst.
func decodeVectorRows(e *Entry, p tensorPlan, codes, scales, mins, sink, dst []byte, ws *generalScratch) bool {
	dt := safetensors.DType(e.DType)
	l := p.layout(e.Shape)
	rot, ok := vectorPlan(p, dt, l)
	if !ok {
		return false
	}
	width := dt.Bits() / 8
	seqBytes, sinkBytes := l.seq*l.dim*width, p.Sink*l.dim*width
	_, scalesPer := l.perOuter()
	codesPer := l.keep * l.dim * p.Bits / 8 // whole bytes: dim is a multiple of 8
	minsPer := 0
	if p.Scheme == SchemeAsym {
		minsPer = scalesPer
	}
	if len(codes) != l.outer*codesPer || len(scales) != l.outer*scalesPer || len(mins) != l.outer*minsPer ||
		len(sink) != l.outer*sinkBytes || len(dst) != l.outer*seqBytes {
		return false
	}
	for o := range l.outer {
		base := o * seqBytes
		copy(dst[base:base+sinkBytes], sink[o*sinkBytes:(o+1)*sinkBytes])
		job := rowDecodeJob{
			codes: codes[o*codesPer : (o+1)*codesPer], scales: scales[o*scalesPer : (o+1)*scalesPer],
			dt: dt, dim: l.dim, group: p.Group, rot: rot, dst: dst[base+sinkBytes : base+seqBytes],
			spec: specOf(p), mins: mins[o*minsPer : (o+1)*minsPer],
		}
		if p.Axis == AxisSeq {
			ws.deq = grow(ws.deq, l.keep*l.dim)
			ok = decodeChannels(job, l.keep, ws.deq)
		} else {
			ok = decodeRows(job)
		}
		if !ok {
			return false
		}
	}
	return true
}
