package compression

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// A preset file's "selection" object (docs/cli.md) says which token selection
// the preset expects the cache to have been through: the method and the keep
// ratio, one for every layer or one per layer. The selection itself needs the
// model's queries and is done in Python (validation/selection.py) before the
// binary runs; the binary checks the object, reports it, and compares the
// per-layer ratios with the layers that carry positions tensors. It is never
// written to the container.

// SelectionMethods are the token-selection methods a preset may name, as
// validation/selection.py spells them.
var SelectionMethods = []string{"attention", "knorm", "recent", "snapkv"}

// MaxSelectionLayers bounds the length of a preset's selection.keep_ratios.
const MaxSelectionLayers = 1 << 16

// PresetSelection is the "selection" object of a preset file, as the file
// gives it: Method, exactly one of KeepRatio and KeepRatios, and optionally
// Window and MinTokens (absent: Python's defaults).
type PresetSelection struct {
	// Method is one of SelectionMethods.
	Method string `json:"method"`
	// KeepRatio, in (0, 1], is the fraction of the context every layer keeps.
	KeepRatio *float64 `json:"keep_ratio,omitempty"`
	// KeepRatios, each in (0, 1], gives each layer its own fraction, layer 0 first.
	KeepRatios []float64 `json:"keep_ratios,omitempty"`
	// Window is the observation window in tokens (>= 1).
	Window *int `json:"window,omitempty"`
	// MinTokens is the fewest positions a layer keeps (>= 1).
	MinTokens *int `json:"min_tokens,omitempty"`
}

// parseSelection decodes a preset's "selection" object: unknown fields are
// refused and every value is checked. JSON null means no selection.
func parseSelection(raw json.RawMessage) (*PresetSelection, error) {
	if len(raw) == 0 || bytes.Equal(bytes.TrimSpace(raw), []byte("null")) {
		return nil, nil
	}
	var s PresetSelection
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&s); err != nil {
		return nil, fmt.Errorf("%w: selection: %v", ErrPreset, err)
	}
	if err := s.Validate(); err != nil {
		return nil, err
	}
	return &s, nil
}

// Validate checks the selection's fields, naming the field, the allowed
// values and the value received; errors wrap ErrPreset. A nil selection is valid.
func (s *PresetSelection) Validate() error {
	if s == nil {
		return nil
	}
	if !slices.Contains(SelectionMethods, s.Method) {
		return fmt.Errorf("%w: selection.method must be one of %v, got %q", ErrPreset, SelectionMethods, s.Method)
	}
	switch {
	case s.KeepRatio == nil && s.KeepRatios == nil:
		return fmt.Errorf("%w: selection needs exactly one of keep_ratio (a number in (0, 1]) or keep_ratios (one per layer), got neither", ErrPreset)
	case s.KeepRatio != nil && s.KeepRatios != nil:
		return fmt.Errorf("%w: selection needs exactly one of keep_ratio or keep_ratios, got both", ErrPreset)
	case s.KeepRatio != nil:
		if r := *s.KeepRatio; !(r > 0 && r <= 1) {
			return fmt.Errorf("%w: selection.keep_ratio must be in (0, 1], got %v", ErrPreset, r)
		}
	default:
		if n := len(s.KeepRatios); n == 0 || n > MaxSelectionLayers {
			return fmt.Errorf("%w: selection.keep_ratios must hold 1 to %d ratios (one per layer), got %d", ErrPreset, MaxSelectionLayers, n)
		}
		for i, r := range s.KeepRatios {
			if !(r > 0 && r <= 1) {
				return fmt.Errorf("%w: selection.keep_ratios[%d] must be in (0, 1], got %v", ErrPreset, i, r)
			}
		}
	}
	for _, f := range []struct {
		name string
		v    *int
	}{{"window", s.Window}, {"min_tokens", s.MinTokens}} {
		if f.v != nil && (*f.v < 1 || *f.v > MaxContextLength) {
			return fmt.Errorf("%w: selection.%s must be an integer in [1, %d], got %d", ErrPreset, f.name, int64(MaxContextLength), *f.v)
		}
	}
	return nil
}

// checkPresetSelection compares a preset's per-layer keep ratios with the
// layers of f that carry positions tensors: when f has any, they must be
// exactly layers 0 to len(KeepRatios)-1. The counts each layer kept are not
// checked (Python bounds them by min_tokens and rounds them). An input with
// no positions tensor, or a selection without keep_ratios, passes.
func checkPresetSelection(f *safetensors.File, s *PresetSelection, preset string) error {
	if s == nil || s.KeepRatios == nil {
		return nil
	}
	n := len(s.KeepRatios)
	have := map[int]bool{}
	for i := range f.Tensors {
		name := f.Tensors[i].Name
		if !IsPositions(name) {
			continue
		}
		layer, err := strconv.Atoi(positionsLayer(name)[len("layer_"):])
		if err != nil || layer >= n {
			return fmt.Errorf("%w: preset %q: selection.keep_ratios has %d ratios (layers 0 to %d) but the input has %s",
				ErrSelection, preset, n, n-1, name)
		}
		have[layer] = true
	}
	if len(have) == 0 {
		return nil
	}
	for layer := range n {
		if !have[layer] {
			return fmt.Errorf("%w: preset %q: selection.keep_ratios has %d ratios (layers 0 to %d) but the input has no layer_%d_positions",
				ErrSelection, preset, n, n-1, layer)
		}
	}
	return nil
}
