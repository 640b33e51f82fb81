package compression

import (
	"fmt"
	"math"
	"slices"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// This file holds the two quantizer options of issue 11 beyond the uniform
// grids of format 1 (docs/format.md, "Non-uniform levels" and "Steps"):
//
//   - the scheme "nf": 2^b non-uniform levels, the Lloyd-Max quantizer of a
//     Gaussian scaled so that its outer levels are ±1, with one float16 scale
//     per group (the group's largest magnitude). Rotated data is close to
//     Gaussian, so these levels spend the codes where the values are.
//   - "steps" for sym and asym: the group's range spans this many uniform
//     steps instead of the code width's 2^(b−1)−1 (sym) or 2^b−1 (asym).
//     Fewer steps than the codes allow leave the outer codes rare; the
//     entropy stage then stores the codes in fewer bits than the width, so
//     the step size, not the width, sets the cost (entropy-constrained
//     quantization). Decoding is unchanged: code·scale (+ minimum).

// SchemeNF is the non-uniform scheme: Lloyd-Max levels for a Gaussian, one
// float16 scale (the group's largest magnitude) per group, codes in [0, 2^b − 1].
const SchemeNF = "nf"

// Schemes lists every quantization scheme.
var Schemes = []string{SchemeSym, SchemeAsym, SchemeNF}

// NFBitWidths are the code widths the nf scheme has level tables for.
var NFBitWidths = []int{2, 3, 4}

// nfTable is one width's levels (ascending, the outer ones ±1) and the
// decision thresholds between neighbours (float32 midpoints), as written in
// docs/format.md. Each decimal is the float32 it denotes, to the last bit.
type nfTable struct {
	levels, thresholds []float32
}

// nfTables holds the Lloyd-Max levels of N(0, 1) divided by the outer level,
// rounded to float32 (the outer levels are exactly ±1), and the float32
// rounding of each midpoint of two neighbours.
var nfTables = map[int]nfTable{
	2: {
		levels:     []float32{-1, -0.299771428, 0.299771428, 1},
		thresholds: []float32{-0.649885714, 0, 0.649885714},
	},
	3: {
		levels: []float32{-1, -0.624508917, -0.351312429, -0.113894224,
			0.113894224, 0.351312429, 0.624508917, 1},
		thresholds: []float32{-0.812254429, -0.487910688, -0.232603326, 0,
			0.232603326, 0.487910688, 0.812254429},
	},
	4: {
		levels: []float32{-1, -0.757163525, -0.59212929, -0.459721863,
			-0.344852537, -0.240343124, -0.14200753, -0.0469865762,
			0.0469865762, 0.14200753, 0.240343124, 0.344852537,
			0.459721863, 0.59212929, 0.757163525, 1},
		thresholds: []float32{-0.878581762, -0.674646378, -0.525925577, -0.402287185,
			-0.29259783, -0.191175327, -0.0944970548, 0,
			0.0944970548, 0.191175327, 0.29259783, 0.402287185,
			0.525925577, 0.674646378, 0.878581762},
	},
}

// NFLevels returns a copy of the nf scheme's levels for a code width (nil
// for a width without a table).
func NFLevels(bits int) []float32 { return slices.Clone(nfTables[bits].levels) }

// MaxSteps is the largest number of steps a group's range may span for a
// scheme and width: the width's own (2^(b−1)−1 for sym, 2^b−1 for asym); nf
// has no steps (0).
func MaxSteps(scheme string, bits int) float64 {
	if scheme == SchemeNF {
		return 0
	}
	_, _, div := levels(scheme, bits)
	return float64(div)
}

// divisor is what a group's magnitude (sym) or range (asym) is divided by to
// give its scale: the plan's steps, or the width's own.
func (p tensorPlan) divisor() float32 {
	if p.Steps != 0 {
		return p.Steps
	}
	_, _, div := levels(p.Scheme, p.Bits)
	return div
}

// checkCodes verifies that a plan's scheme, width and steps go together.
func (p tensorPlan) checkCodes() error {
	if p.Scheme == SchemeNF {
		if !slices.Contains(NFBitWidths, p.Bits) {
			return fmt.Errorf("%w: scheme nf takes bits %v, got %d", ErrConfig, NFBitWidths, p.Bits)
		}
		if p.Steps != 0 {
			return fmt.Errorf("%w: steps apply to schemes sym and asym, not nf", ErrConfig)
		}
		return nil
	}
	if hi := MaxSteps(p.Scheme, p.Bits); p.Steps != 0 && !(p.Steps >= 1 && float64(p.Steps) <= hi) {
		return fmt.Errorf("%w: steps must be in [1, %g] for %s %d-bit codes, got %g", ErrConfig, hi, p.Scheme, p.Bits, p.Steps)
	}
	return nil
}

// validSteps reports whether v can be a plan's steps at all: in [1, 255]
// (255 is the largest width's own, asym 8-bit). Plans use float32(v).
func validSteps(v float64) bool { return v >= 1 && v <= 255 }

// encodeNF quantizes one group with the nf scheme: scale = float16(max|v|),
// t = v / scale (0 for a zero scale), code = the number of thresholds below
// t, reconstruction float32(level · scale) with a zero product made +0.
func (c groupCodec) encodeNF(v []float32, w *bitWriter, deq []float32) (s16, m16 uint16, err error) {
	var mb uint32
	for _, x := range v {
		mb = max(mb, math.Float32bits(x)&0x7fffffff)
	}
	m := math.Float32frombits(mb)
	s16 = safetensors.F32ToF16(m)
	if s16 == 0x7c00 {
		return 0, 0, fmt.Errorf("%w (group max |x| = %g)", ErrScaleOverflow, m)
	}
	s := safetensors.F16ToF32(s16)
	for i, x := range v {
		var t float32
		if s != 0 {
			t = x / s
		}
		q := nfCode(c.nf.thresholds, t)
		w.put(uint32(q), c.bits)
		deq[i] = c.value(q, s, 0)
	}
	return s16, 0, nil
}

// nfCode returns the number of thresholds strictly below t: a value on a
// threshold takes the lower level. thr is ascending.
func nfCode(thr []float32, t float32) int32 {
	lo, hi := 0, len(thr)
	for lo < hi {
		mid := (lo + hi) / 2
		if thr[mid] < t {
			lo = mid + 1
		} else {
			hi = mid
		}
	}
	return int32(lo)
}
