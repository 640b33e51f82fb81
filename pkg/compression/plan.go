package compression

import (
	"fmt"
	"regexp"
	"slices"
)

// SeqGroupSizes are the group sizes allowed for groups that run along the
// sequence axis (per-channel keys): longer groups than along head_dim, since
// a channel holds one value per token.
var SeqGroupSizes = []int{32, 64, 128, 256, 512, 1024}

// RolePlan overrides the codec of one role of tensors (keys or values, of all
// layers or of some). An empty field keeps what the level below chose: the
// codec's flags, then the role's plan, then each matching layer's plan.
type RolePlan struct {
	// Scheme is "sym" or "asym".
	Scheme string `json:"scheme,omitempty"`
	// Bits is the code width: 2, 3, 4 or 8.
	Bits int `json:"bits,omitempty"`
	// GroupSize is the number of values per scale: 32, 64 or 128 along
	// head_dim; up to 1024 along the sequence (axis "channel").
	GroupSize int `json:"group_size,omitempty"`
	// Rotate is "none" or "hadamard".
	Rotate string `json:"rotate,omitempty"`
	// Axis is "token" (groups along head_dim) or "channel" (along the
	// sequence, one channel at a time). Only keys and values accept it.
	Axis string `json:"axis,omitempty"`
	// Sink is the number of leading positions kept exact (nil: inherited).
	Sink *int `json:"sink,omitempty"`
	// Steps (sym and asym) is how many uniform steps the group's magnitude
	// or range spans, at most the width's own (7 for sym 4-bit); fewer make
	// finer codes rarer, for the entropy stage to store (nonuniform.go).
	Steps float64 `json:"steps,omitempty"`
}

// LayerPlan applies role plans to the listed layers only.
type LayerPlan struct {
	// Layers are the layer indices (the i of layer_{i}_key) it applies to.
	Layers []int     `json:"layers"`
	Keys   *RolePlan `json:"keys,omitempty"`
	Values *RolePlan `json:"values,omitempty"`
}

// RolePlans are per-role, per-layer plans on top of a Config: Keys and
// Values for every layer, then each LayerPlan listing the tensor's layer, in order.
type RolePlans struct {
	Keys   *RolePlan   `json:"keys,omitempty"`
	Values *RolePlan   `json:"values,omitempty"`
	Layers []LayerPlan `json:"layers,omitempty"`
}

// validate checks every field, naming it (path is its JSON path).
func (r *RolePlan) validate(path string) error {
	if r == nil {
		return nil
	}
	if r.Scheme != "" && !slices.Contains(Schemes, r.Scheme) {
		return fmt.Errorf("%w: %s.scheme must be one of %v, got %q", ErrConfig, path, Schemes, r.Scheme)
	}
	if r.Scheme == SchemeNF && r.Bits != 0 && !slices.Contains(NFBitWidths, r.Bits) {
		return fmt.Errorf("%w: %s.bits must be one of %v with scheme nf, got %d", ErrConfig, path, NFBitWidths, r.Bits)
	}
	if r.Steps != 0 && !validSteps(r.Steps) {
		return fmt.Errorf("%w: %s.steps must be a number in [1, 255], got %v", ErrConfig, path, r.Steps)
	}
	if r.Steps != 0 && r.Scheme == SchemeNF {
		return fmt.Errorf("%w: %s.steps apply to schemes sym and asym, not nf", ErrConfig, path)
	}
	if r.Bits != 0 && !slices.Contains(BitWidths, r.Bits) {
		return fmt.Errorf("%w: %s.bits must be one of %v, got %d", ErrConfig, path, BitWidths, r.Bits)
	}
	if r.Rotate != "" && r.Rotate != RotateNone && r.Rotate != RotateHadamard {
		return fmt.Errorf("%w: %s.rotate must be one of [none hadamard], got %q", ErrConfig, path, r.Rotate)
	}
	if r.Axis != "" && r.Axis != KeyAxisToken && r.Axis != KeyAxisChannel {
		return fmt.Errorf("%w: %s.axis must be one of [token channel], got %q", ErrConfig, path, r.Axis)
	}
	if r.GroupSize != 0 && !slices.Contains(SeqGroupSizes, r.GroupSize) {
		return fmt.Errorf("%w: %s.group_size must be one of %v, got %d", ErrConfig, path, SeqGroupSizes, r.GroupSize)
	}
	if r.GroupSize > 128 && r.Axis != KeyAxisChannel {
		return fmt.Errorf("%w: %s.group_size %d needs axis \"channel\" (groups along head_dim take at most 128)", ErrConfig, path, r.GroupSize)
	}
	if r.Sink != nil && (*r.Sink < 0 || *r.Sink > MaxSink) {
		return fmt.Errorf("%w: %s.sink must be in [0, %d], got %d", ErrConfig, path, MaxSink, *r.Sink)
	}
	return nil
}

// Validate checks every plan, naming the offending field.
func (rp *RolePlans) Validate() error {
	if rp == nil {
		return nil
	}
	if err := rp.Keys.validate("keys"); err != nil {
		return err
	}
	if err := rp.Values.validate("values"); err != nil {
		return err
	}
	for i, lp := range rp.Layers {
		path := fmt.Sprintf("layers[%d]", i)
		if len(lp.Layers) == 0 {
			return fmt.Errorf("%w: %s.layers must list at least one layer index", ErrConfig, path)
		}
		for _, l := range lp.Layers {
			if l < 0 {
				return fmt.Errorf("%w: %s.layers holds %d; layer indices are >= 0", ErrConfig, path, l)
			}
		}
		if err := lp.Keys.validate(path + ".keys"); err != nil {
			return err
		}
		if err := lp.Values.validate(path + ".values"); err != nil {
			return err
		}
	}
	return nil
}

// apply lays a role plan over p. sink is the requested (not yet clipped) sink.
func (r *RolePlan) apply(p *tensorPlan, sink *int, rank int) {
	if r == nil {
		return
	}
	p.Scheme = or(r.Scheme, p.Scheme)
	p.Bits = or(r.Bits, p.Bits)
	p.Group = or(r.GroupSize, p.Group)
	p.Rotate = or(r.Rotate, p.Rotate)
	if r.Steps != 0 {
		p.Steps = float32(r.Steps)
	}
	switch {
	case r.Axis == KeyAxisChannel && rank >= 2:
		p.Axis = AxisSeq
	case r.Axis == KeyAxisToken:
		p.Axis = AxisLast
	}
	if r.Sink != nil {
		*sink = *r.Sink
	}
}

// applyRoles lays the role and layer plans that match a tensor over p.
func (rp *RolePlans) applyRoles(name string, p *tensorPlan, sink *int, rank int) {
	if rp == nil {
		return
	}
	role, layer := Role(name), layerOf(name)
	pick := func(keys, values *RolePlan) *RolePlan {
		switch role {
		case "key":
			return keys
		case "value":
			return values
		}
		return nil
	}
	pick(rp.Keys, rp.Values).apply(p, sink, rank)
	for _, lp := range rp.Layers {
		if slices.Contains(lp.Layers, layer) {
			pick(lp.Keys, lp.Values).apply(p, sink, rank)
		}
	}
}

// layerOf returns i for layer_{i}_key / layer_{i}_value, -1 otherwise.
func layerOf(name string) int {
	for _, re := range []*regexp.Regexp{keyName, valueName} {
		if m := re.FindStringSubmatch(name); m != nil {
			n := 0
			for _, c := range m[1] {
				n = n*10 + int(c-'0')
				if n > 1<<30 {
					return -1
				}
			}
			return n
		}
	}
	return -1
}

// checkGroup verifies a plan's group size for its axis.
func (p tensorPlan) checkGroup() error {
	allowed := GroupSizes
	if p.Axis == AxisSeq {
		allowed = SeqGroupSizes
	}
	if !slices.Contains(allowed, p.Group) {
		return fmt.Errorf("%w: group size %d with axis %q (want one of %v)", ErrCorrupt, p.Group, p.Axis, allowed)
	}
	return nil
}

// ownGroup is what an entry records as its own group size: 0 (absent) when
// the plan uses the codec's.
func ownGroup(p tensorPlan, cfg Config) int {
	if p.Group == cfg.GroupSize {
		return 0
	}
	return p.Group
}
