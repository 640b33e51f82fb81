package compression

import (
	"fmt"
	"math"
	"slices"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// ProjectionEntry is the optional "projection" object of a container's index
// entry: the tensor's rows were projected onto Rank coefficients per head
// before quantizing, and the entry embeds the basis and mean it needs, so a
// container decodes on its own (docs/decisions/ADR-008-low-rank-projection.md).
type ProjectionEntry struct {
	// Rank is r, the number of coefficients per row (1 <= r <= head_dim).
	Rank int `json:"rank"`
	// Heads is the number of bases: the tensor's axis before the sequence, or 1.
	Heads int `json:"heads"`
	// DType is the stored dtype of basis and mean: F16 or F32.
	DType string `json:"dtype"`
	// Basis ([heads][head_dim][rank]) and Mean ([heads][head_dim]) are payloads.
	Basis *Payload `json:"basis"`
	Mean  *Payload `json:"mean"`
}

// payloads lists every payload of an entry, projection ones included, in a fixed order.
func (e *Entry) payloads() []*Payload {
	out := []*Payload{e.Codes, e.Scales, e.Mins, e.SinkP, e.Raw}
	if e.Projection != nil {
		out = append(out, e.Projection.Basis, e.Projection.Mean)
	}
	return out
}

// coefShape is the shape of a projected tensor's coefficients: the sink
// positions cut off the sequence axis, the last axis of length rank.
func coefShape(shape []int64, sink, rank int) []int64 {
	s := slices.Clone(shape)
	s[len(s)-2] -= int64(sink)
	s[len(s)-1] = int64(rank)
	return s
}

// coefPlan is the plan of a projected tensor's coefficients: the tensor's
// plan without a sink (the sink positions are stored exact, in full).
func coefPlan(p tensorPlan) tensorPlan {
	p.Sink = 0
	return p
}

// projScratch is the per-worker working memory of projected tensors.
type projScratch struct {
	x, coef, y []float32
	coefBytes  []byte
}

// compressProjected encodes tensor t through basis b: the first plan.Sink
// positions exact, the rest projected and the coefficients quantized with plan.
func compressProjected(t *safetensors.Tensor, plan tensorPlan, cfg Config, ws *workerScratch, ct compressedTensor, b *ProjectionBasis) (compressedTensor, error) {
	if err := b.fits(t.Shape); err != nil {
		return ct, err
	}
	g := geometryOf(t.Shape)
	n := g.outer * g.seq * g.dim
	keep, r := g.seq-plan.Sink, b.Rank
	cs := coefShape(t.Shape, plan.Sink, r)
	cp := coefPlan(plan)
	if err := cp.check(cs); err != nil {
		return ct, fmt.Errorf("coefficients of rank %d: %w", r, err)
	}
	ps := &ws.proj
	ps.x = grow(ps.x, n)
	if err := safetensors.DecodeFloat32(t.DType, t.Data, ps.x); err != nil {
		return ct, err
	}
	for i, v := range ps.x {
		if math.Float32bits(v)&0x7fffffff >= 0x7f800000 {
			return ct, fmt.Errorf("%w (element %d)", ErrNonFinite, i)
		}
	}
	nc := g.outer * keep * r
	ps.coef = grow(ps.coef, nc)
	for o := range g.outer {
		b.project(b.head(o), ps.x[(o*g.seq+plan.Sink)*g.dim:(o+1)*g.seq*g.dim], ps.coef[o*keep*r:(o+1)*keep*r])
	}
	for _, v := range ps.coef[:nc] {
		if math.Float32bits(v)&0x7fffffff >= 0x7f800000 {
			return ct, fmt.Errorf("%w: a projection coefficient leaves float32's range", ErrScaleOverflow)
		}
	}
	ps.coefBytes = grow(ps.coefBytes, 4*nc)
	if err := safetensors.EncodeFloat32(safetensors.F32, ps.coef[:nc], ps.coefBytes); err != nil {
		return ct, err
	}
	coefT := safetensors.Tensor{Name: t.Name, DType: safetensors.F32, Shape: cs, Data: ps.coefBytes}
	enc, err := encodeGeneral(&coefT, cp, cfg.Sparsity, &ws.general)
	if err != nil {
		return ct, err
	}
	// Decode the coefficients as a decoder will, then measure the
	// reconstruction against the original in the tensor's own dtype.
	probe := Entry{DType: string(safetensors.F32), Shape: cs}
	if err := decodeGeneral(&probe, cp, enc.codes, enc.scales, enc.mins, nil, ps.coefBytes, &ws.general); err != nil {
		return ct, err
	}
	width := t.DType.Bits() / 8
	sinkBytes := plan.Sink * g.dim * width
	var sink []byte
	if plan.Sink > 0 {
		sink = make([]byte, g.outer*sinkBytes)
		for o := range g.outer {
			copy(sink[o*sinkBytes:(o+1)*sinkBytes], t.Data[o*g.seq*g.dim*width:])
		}
	}
	ps.y = grow(ps.y, keep*g.dim)
	ps.coef = grow(ps.coef, nc)
	_ = safetensors.DecodeFloat32(safetensors.F32, ps.coefBytes, ps.coef[:nc])
	var st tensorStats
	var gs groupStats
	for o := range g.outer {
		st.addExact(ps.x[o*g.seq*g.dim : (o*g.seq+plan.Sink)*g.dim])
		b.reconstruct(b.head(o), ps.coef[o*keep*r:(o+1)*keep*r], ps.y)
		orig := ps.x[(o*g.seq+plan.Sink)*g.dim : (o+1)*g.seq*g.dim]
		for i, v := range ps.y {
			gs.add(orig[i], safetensors.RoundTo(t.DType, saturate(t.DType, v)))
			if i%64 == 63 { // flush float32 partial sums often enough to stay accurate
				st.addGroup(&gs, 0)
				gs = groupStats{maxErr: gs.maxErr}
			}
		}
		st.addGroup(&gs, 0)
		gs = groupStats{maxErr: gs.maxErr}
	}
	st.n = int64(n)

	e := &ct.entry
	e.Mode, e.Scheme, e.Axis, e.Rotate, e.Sink = modeName(plan.Bits), plan.Scheme, plan.Axis, plan.Rotate, plan.Sink
	e.GroupSize = ownGroup(plan, cfg)
	add := func(suffix string, raw []byte) *Payload {
		data, encoding := ws.pe.encode(raw)
		p := &Payload{Tensor: t.Name + suffix, Encoding: encoding, RawBytes: int64(len(raw)), CRC32C: checksum(data)}
		ct.payload = append(ct.payload, u8Tensor(p.Tensor, data))
		ct.report.CompressedBytes += int64(len(data))
		return p
	}
	e.Codes = add(SuffixCodes, enc.codes)
	e.Scales = add(SuffixScales, enc.scales)
	if len(enc.mins) > 0 {
		e.Mins = add(SuffixMins, enc.mins)
	}
	if sink != nil {
		e.SinkP = add(SuffixSink, sink)
	}
	e.Projection = &ProjectionEntry{Rank: r, Heads: b.Heads, DType: string(b.DType)}
	e.Projection.Basis = add(SuffixBasis, b.basisRaw)
	e.Projection.Mean = add(SuffixMean, b.meanRaw)
	ct.stats = st
	ct.report.Mode = e.Mode
	ct.report.Quality = st.quality()
	return ct, nil
}

// checkProjection validates a projected entry's fields against its shape
// and returns the shape of its coefficients.
func checkProjection(e *Entry, p tensorPlan) ([]int64, error) {
	pe := e.Projection
	dt := safetensors.DType(pe.DType)
	if dt != safetensors.F16 && dt != safetensors.F32 {
		return nil, fmt.Errorf("%w: projection dtype must be one of [F16 F32], got %q", ErrProjection, pe.DType)
	}
	if len(e.Shape) < 2 {
		return nil, fmt.Errorf("%w: projection of a tensor of rank %d (want 2 or more)", ErrProjection, len(e.Shape))
	}
	dim := e.Shape[len(e.Shape)-1]
	if pe.Rank < 1 || int64(pe.Rank) > dim || pe.Heads < 1 {
		return nil, fmt.Errorf("%w: rank %d, heads %d for head_dim %d (want 1 <= rank <= head_dim, heads >= 1)", ErrProjection, pe.Rank, pe.Heads, dim)
	}
	if !basisFits(int64(pe.Heads), dim, int64(pe.Rank)) {
		return nil, fmt.Errorf("%w: %d heads x %d x %d exceeds %d basis elements", ErrProjection, pe.Heads, dim, pe.Rank, maxBasisElements)
	}
	b := ProjectionBasis{Heads: pe.Heads, Dim: int(dim), Rank: pe.Rank}
	if err := b.fits(e.Shape); err != nil {
		return nil, err
	}
	cs := coefShape(e.Shape, p.Sink, pe.Rank)
	if err := coefPlan(p).check(cs); err != nil {
		return nil, fmt.Errorf("%w: coefficients: %v", ErrCorrupt, err)
	}
	return cs, nil
}

// decodeProjected rebuilds a projected tensor into data, which has exactly its size.
func decodeProjected(src *source, e *Entry, plan tensorPlan, dt safetensors.DType, data []byte, s *decompressScratch) error {
	pe := e.Projection
	raw := make([][]byte, 6)
	for k, p := range []*Payload{e.Codes, e.Scales, e.Mins, e.SinkP, pe.Basis, pe.Mean} {
		if p == nil {
			continue
		}
		if k < 4 {
			s.parts[k] = grow(s.parts[k][:0], int(p.RawBytes))
			raw[k] = s.parts[k]
		} else {
			raw[k] = make([]byte, p.RawBytes)
		}
		if err := readPayload(src, p, raw[k], &s.in); err != nil {
			return err
		}
	}
	g := geometryOf(e.Shape)
	b, err := NewProjectionBasis(pe.Heads, g.dim, pe.Rank, safetensors.DType(pe.DType), raw[4], raw[5])
	if err != nil {
		return err
	}
	keep, r := g.seq-plan.Sink, pe.Rank
	cs := coefShape(e.Shape, plan.Sink, r)
	nc := g.outer * keep * r
	ps := &s.proj
	ps.coefBytes = grow(ps.coefBytes, 4*nc)
	probe := Entry{DType: string(safetensors.F32), Shape: cs}
	if err := decodeGeneral(&probe, coefPlan(plan), raw[0], raw[1], raw[2], nil, ps.coefBytes, &s.general); err != nil {
		return err
	}
	ps.coef = grow(ps.coef, nc)
	_ = safetensors.DecodeFloat32(safetensors.F32, ps.coefBytes, ps.coef)
	ps.y = grow(ps.y, keep*g.dim)
	width := dt.Bits() / 8
	seqBytes, sinkBytes := g.seq*g.dim*width, plan.Sink*g.dim*width
	for o := range g.outer {
		base := o * seqBytes
		copy(data[base:base+sinkBytes], raw[3][o*sinkBytes:(o+1)*sinkBytes])
		b.reconstruct(b.head(o), ps.coef[o*keep*r:(o+1)*keep*r], ps.y)
		saturateAll(dt, ps.y)
		if err := safetensors.EncodeFloat32(dt, ps.y, data[base+sinkBytes:base+seqBytes]); err != nil {
			return err
		}
	}
	return nil
}
