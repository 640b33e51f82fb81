package compression

import (
	"fmt"
	"math"
	"regexp"
	"strconv"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// Quantization schemes, rotations and key axes accepted by Config.
const (
	SchemeSym  = "sym"  // scale = max|x| / qmax, codes in [-(qmax+1), qmax]
	SchemeAsym = "asym" // float16 minimum and scale, codes in [0, 2^bits - 1]
	// SchemeNF ("nf", non-uniform levels) is in nonuniform.go.

	RotateNone     = "none"
	RotateHadamard = "hadamard" // orthonormal Walsh–Hadamard with fixed random signs along the last axis

	KeyAxisToken   = "token"   // key groups run along the last axis, like every other tensor
	KeyAxisChannel = "channel" // key groups run along the sequence axis, one channel at a time

	AxisLast = "last" // groups of consecutive elements along the last axis
	AxisSeq  = "seq"  // groups along the second-to-last (sequence) axis
)

// Allowed code widths.
var BitWidths = []int{2, 3, 4, 8}

// MaxSink bounds --sink; a larger value is a usage error.
const MaxSink = 1 << 20

var (
	keyName   = regexp.MustCompile(`^layer_(0|[1-9][0-9]*)_key$`)
	valueName = regexp.MustCompile(`^layer_(0|[1-9][0-9]*)_value$`)
)

// Role classifies a tensor by name: "key", "value" or "other".
func Role(name string) string {
	switch {
	case keyName.MatchString(name):
		return "key"
	case valueName.MatchString(name):
		return "value"
	default:
		return "other"
	}
}

// tensorPlan is how one floating-point tensor is encoded; it is recorded in
// the tensor's index entry, so decoding needs no flags.
type tensorPlan struct {
	Scheme string
	Bits   int
	Axis   string
	Rotate string
	Sink   int // leading positions along the sequence axis kept exact
	Group  int
	// Steps, when not 0, is the divisor of the group's magnitude (sym) or
	// range (asym) in place of the width's own (nonuniform.go). Only the
	// encoder reads it: decoding is code·scale whatever it was.
	Steps float32
	// exact asks for the error in the original basis (Config.ExactMetrics);
	// it is not part of the format.
	exact bool
}

// fast reports whether the plan is the original scheme, which has a tuned path.
func (p tensorPlan) fast() bool {
	return p.Scheme == SchemeSym && p.Bits == 4 && p.Axis == AxisLast && p.Rotate == RotateNone && p.Sink == 0 && p.Steps == 0
}

// rotatedMetrics reports whether a tensor of dtype dt is measured in the
// rotated basis: its error taken between the rotated values and their
// quantized reconstruction, before the inverse rotation and the rounding to
// the stored dtype, which saves the inverse rotation. The rotation is
// orthonormal, so Σ(x−y)², Σx², Σy² and Σxy are the same there up to float32
// rounding and that final rounding; the largest error becomes the largest
// over rotated coefficients (docs/cli.md). The final rounding's share of the
// error energy is at most 2^-2p·Σy²/Σ(x−y)² for a dtype of p significant bits
// (11 for float16, 8 for bfloat16): about 0.1% of the RMSE or less at 2 to 4 bits, but not at 8 bits in float16 or
// bfloat16, which are measured in the original basis. So are tensors
// sparsified before the rotation, whose sparsification error would not show,
// and every tensor under Config.ExactMetrics.
//
// A tensor whose rotated values reach rotatedMetricsLimit is measured in the
// original basis too (encodeGeneral checks it): its reconstruction might
// leave the dtype's range, which only the original basis shows.
func (p tensorPlan) rotatedMetrics(dt safetensors.DType, sparsity float64) bool {
	if p.Rotate != RotateHadamard || p.exact || sparsity != 0 {
		return false
	}
	return p.Bits <= 4 || dt == safetensors.F32 || dt == safetensors.F64
}

// rotatedMetricsLimit is the magnitude of a rotated value from which the
// reconstruction of its row might reach dt's largest finite value. A
// reconstructed coefficient is at most twice the group's largest magnitude
// (2-bit symmetric codes reach −2·scale with scale = max), and each restored
// element sums n coefficients times 1/√n, so it stays below 2·√n times the
// largest rotated value.
func rotatedMetricsLimit(dt safetensors.DType, n int) float32 {
	top := 3.3895313892515355e38 // bfloat16's and (about) float32's largest finite value
	if dt == safetensors.F16 {
		top = 65504
	}
	return float32(top / (2 * math.Sqrt(float64(n))))
}

// geometry views a tensor of rank >= 1 as [outer, seq, dim]: dim is the last
// axis, seq the one before it (1 for a vector), outer the product of the rest.
type geometry struct{ outer, seq, dim int }

func geometryOf(shape []int64) geometry {
	g := geometry{outer: 1, seq: 1, dim: int(shape[len(shape)-1])}
	if len(shape) >= 2 {
		g.seq = int(shape[len(shape)-2])
		for _, d := range shape[:len(shape)-2] {
			g.outer *= int(d)
		}
	}
	return g
}

// planFor chooses the plan of a floating tensor from the configuration and
// checks that its shape allows it.
func planFor(name string, shape []int64, cfg Config) (tensorPlan, error) {
	p := tensorPlan{Scheme: cfg.scheme(), Bits: cfg.bits(), Axis: AxisLast, Rotate: cfg.rotate(), Group: cfg.GroupSize, exact: cfg.ExactMetrics}
	switch Role(name) {
	case "key":
		p.Bits = cfg.keyBits()
		if cfg.keyAxis() == KeyAxisChannel && len(shape) >= 2 {
			p.Axis = AxisSeq
		}
	case "value":
		p.Bits = cfg.valueBits()
	}
	sink := cfg.Sink
	cfg.Roles.applyRoles(name, &p, &sink, len(shape))
	if len(shape) >= 2 {
		p.Sink = min(sink, int(shape[len(shape)-2]))
	}
	if err := p.check(shape); err != nil {
		return p, err
	}
	if err := p.checkCodes(); err != nil {
		return p, fmt.Errorf("tensor %q: %w", name, err)
	}
	return p, nil
}

// check verifies that the plan can encode a tensor of this shape.
func (p tensorPlan) check(shape []int64) error {
	if len(shape) == 0 {
		return fmt.Errorf("%w: a scalar has no axis to group along (group size %d)", ErrGroupSize, p.Group)
	}
	last := shape[len(shape)-1]
	if p.Axis == AxisLast && last%int64(p.Group) != 0 {
		return fmt.Errorf("%w: last dimension %d of shape %v, group size %d", ErrGroupSize, last, shape, p.Group)
	}
	if p.Axis == AxisSeq && len(shape) < 2 {
		return fmt.Errorf("%w: axis %q needs a tensor of rank 2 or more, shape %v", ErrCorrupt, p.Axis, shape)
	}
	if p.Sink < 0 || (len(shape) >= 2 && int64(p.Sink) > shape[len(shape)-2]) || (len(shape) < 2 && p.Sink != 0) {
		return fmt.Errorf("%w: sink %d does not fit shape %v", ErrCorrupt, p.Sink, shape)
	}
	return nil
}

// layout describes the quantized region after the sink is cut off: rows of
// length rowLen, each cut into groups of at most Group elements.
type layout struct {
	geometry
	keep      int // sequence positions quantized per outer index: seq - sink
	rows      int
	rowLen    int
	groupsRow int
}

func (p tensorPlan) layout(shape []int64) layout {
	l := layout{geometry: geometryOf(shape)}
	l.keep = l.seq - p.Sink
	if p.Axis == AxisSeq {
		l.rows, l.rowLen = l.outer*l.dim, l.keep
	} else {
		l.rows, l.rowLen = l.outer*l.keep, l.dim
	}
	if l.rowLen > 0 {
		l.groupsRow = (l.rowLen + p.Group - 1) / p.Group
	}
	return l
}

func (l layout) quantized() int { return l.outer * l.keep * l.dim }
func (l layout) groups() int    { return l.rows * l.groupsRow }

// perOuter returns the bytes of 4-bit codes and of float16 scales that one
// outer index ([seq, dim] block) takes.
func (l layout) perOuter() (codes, scales int) {
	return l.keep * l.dim / 2, 2 * l.groups() / max(l.outer, 1)
}

// payloadSizes returns the raw byte sizes of a plan's payloads for a tensor
// of the given shape whose elements are width bytes wide.
func (p tensorPlan) payloadSizes(shape []int64, width int) (codes, scales, mins, sink int64) {
	l := p.layout(shape)
	codes = (int64(l.quantized())*int64(p.Bits) + 7) / 8
	scales = 2 * int64(l.groups())
	if p.Scheme == SchemeAsym {
		mins = scales
	}
	sink = int64(l.outer) * int64(p.Sink) * int64(l.dim) * int64(width)
	return
}

// modeName is the index mode of a quantized tensor: "int4", "int8", ...
func modeName(bits int) string { return "int" + strconv.Itoa(bits) }

// bitsOfMode parses a quantized mode name, returning 0 for anything else.
func bitsOfMode(mode string) int {
	for _, b := range BitWidths {
		if mode == modeName(b) {
			return b
		}
	}
	return 0
}

// levels returns the code range of a scheme: sym [-(2^(b-1)), 2^(b-1)-1] with
// qmax = 2^(b-1)-1 as the scale's divisor; asym [0, 2^b-1] with 2^b-1 as divisor.
func levels(scheme string, bits int) (lo, hi int32, divisor float32) {
	if scheme == SchemeAsym {
		hi = int32(1)<<bits - 1
		return 0, hi, float32(hi)
	}
	hi = int32(1)<<(bits-1) - 1
	return -hi - 1, hi, float32(hi)
}

// roundHalfEven rounds a float32 to the nearest integer, ties to even.
func roundHalfEven(v float32) float32 { return float32(math.RoundToEven(float64(v))) }
