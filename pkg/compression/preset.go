package compression

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// ErrPreset marks an unknown preset name or an invalid preset file: a usage error.
var ErrPreset = errors.New("compression: invalid preset")

// Preset is a named codec configuration: global parameters plus, optionally,
// plans of their own for keys and values, per layer.
type Preset struct {
	// Name identifies the preset in reports and containers.
	Name string `json:"name"`
	// Description says in a sentence what it is for.
	Description string `json:"description"`
	// Config is the configuration it runs (Workers is left to the caller).
	Config Config `json:"-"`
}

// Built-in preset names.
const (
	PresetSeed         = "seed"
	PresetDefault      = "default"
	PresetCompact      = "compact"
	PresetNearLossless = "near-lossless"
)

// Presets returns the built-in presets, in the order `kv-compress version` lists them.
func Presets() []Preset {
	seed := SeedConfig()
	seed.Entropy = EntropyLZ4
	// compact: 3-bit grids for keys (7 steps) and a 9-level grid for values
	// (4 steps), each held in 4-bit codes, which the entropy stage stores in
	// fewer bits than 3-bit codes take (docs/codec-frontier.md); tensors
	// that are neither keys nor values get 3-bit codes.
	compact := DefaultConfig()
	compact.Bits = 3
	compact.Roles = &RolePlans{
		Keys:   &RolePlan{Scheme: SchemeAsym, Rotate: RotateNone, Axis: KeyAxisChannel, GroupSize: 128, Bits: 4, Steps: 7},
		Values: &RolePlan{Bits: 4, Steps: 4},
	}
	near := Config{GroupSize: 64, Scheme: SchemeSym, Rotate: RotateNone, KeyAxis: KeyAxisToken, Bits: 8, Entropy: EntropyAuto}
	out := []Preset{
		{Name: PresetSeed, Description: "the seed's scheme: symmetric INT4, G = 64, no rotation, LZ4 (as format version 1 wrote it)", Config: seed},
		{Name: PresetDefault, Description: "symmetric 4-bit, G = 64, Hadamard rotation, per-channel keys, first position exact, entropy stage", Config: DefaultConfig()},
		{Name: PresetCompact, Description: "about 2.9 bits on disk: asymmetric per-channel keys (G = 128 along the tokens, no rotation, 7 steps), symmetric rotated values (G = 64, 4 steps), both in 4-bit codes, first position exact, entropy stage", Config: compact},
		{Name: PresetNearLossless, Description: "symmetric 8-bit, G = 64, entropy stage", Config: near},
	}
	for i := range out {
		out[i].Config.Preset = out[i].Name
	}
	return out
}

// PresetNames lists the built-in presets' names.
func PresetNames() []string {
	var names []string
	for _, p := range Presets() {
		names = append(names, p.Name)
	}
	return names
}

// presetFile is the JSON schema of a preset file (docs/cli.md). Every
// field is optional; "base" names the built-in preset the others modify.
type presetFile struct {
	Name        string      `json:"name"`
	Description string      `json:"description"`
	Base        string      `json:"base"`
	Codec       *codecFile  `json:"codec"`
	Keys        *RolePlan   `json:"keys"`
	Values      *RolePlan   `json:"values"`
	Layers      []LayerPlan `json:"layers"`
	// Projection names a low-rank bases file (projection_preset.go).
	Projection *projectionFile `json:"projection"`
	// Selection is the token selection the preset expects (selection_preset.go).
	Selection json.RawMessage `json:"selection"`
}

// codecFile is the "codec" object of a preset file: the global flags.
type codecFile struct {
	GroupSize *int     `json:"group_size"`
	Scheme    *string  `json:"scheme"`
	Rotate    *string  `json:"rotate"`
	KeyAxis   *string  `json:"key_axis"`
	Sink      *int     `json:"sink"`
	Bits      *int     `json:"bits"`
	KeyBits   *int     `json:"key_bits"`
	ValueBits *int     `json:"value_bits"`
	Sparsity  *float64 `json:"sparsity"`
	Entropy   *string  `json:"entropy"`
}

// LoadPreset resolves NAME (a built-in preset) or FILE (a JSON preset file,
// any argument that is not a built-in name). Errors name the file and the field.
func LoadPreset(nameOrFile string) (Preset, error) {
	for _, p := range Presets() {
		if p.Name == nameOrFile {
			return p, nil
		}
	}
	raw, err := os.ReadFile(nameOrFile)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) && !strings.ContainsAny(nameOrFile, "/.") {
			return Preset{}, fmt.Errorf("%w: %q is neither a built-in preset %v nor a file", ErrPreset, nameOrFile, PresetNames())
		}
		return Preset{}, fmt.Errorf("%w: %s: %v", ErrPreset, nameOrFile, err)
	}
	p, err := ParsePresetIn(raw, filepath.Dir(nameOrFile))
	if err != nil {
		return Preset{}, fmt.Errorf("%s: %w", nameOrFile, err)
	}
	return p, nil
}

// ParsePreset reads a preset file's JSON: unknown fields are refused, every
// value is checked, and errors name the field. A bases file named by its
// "projection" object is looked for in the working directory.
func ParsePreset(raw []byte) (Preset, error) { return ParsePresetIn(raw, ".") }

// ParsePresetIn is ParsePreset for a preset file in folder dir: a relative
// bases file named by its "projection" object is read from dir.
func ParsePresetIn(raw []byte, dir string) (Preset, error) {
	var f presetFile
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		return Preset{}, fmt.Errorf("%w: %v", ErrPreset, err)
	}
	if dec.More() {
		return Preset{}, fmt.Errorf("%w: more than one JSON value", ErrPreset)
	}
	base := or(f.Base, PresetDefault)
	i := slices.IndexFunc(Presets(), func(p Preset) bool { return p.Name == base })
	if i < 0 {
		return Preset{}, fmt.Errorf("%w: base must be one of %v, got %q", ErrPreset, PresetNames(), base)
	}
	p := Presets()[i]
	p.Name, p.Description = or(f.Name, "custom"), f.Description
	c := &p.Config
	c.Preset = p.Name
	if cf := f.Codec; cf != nil {
		setIf(&c.GroupSize, cf.GroupSize)
		setIf(&c.Scheme, cf.Scheme)
		setIf(&c.Rotate, cf.Rotate)
		setIf(&c.KeyAxis, cf.KeyAxis)
		setIf(&c.Sink, cf.Sink)
		setIf(&c.Bits, cf.Bits)
		setIf(&c.KeyBits, cf.KeyBits)
		setIf(&c.ValueBits, cf.ValueBits)
		setIf(&c.Sparsity, cf.Sparsity)
		setIf(&c.Entropy, cf.Entropy)
	}
	if f.Keys != nil || f.Values != nil || f.Layers != nil {
		roles := RolePlans{}
		if c.Roles != nil {
			roles = *c.Roles
		}
		if f.Keys != nil {
			roles.Keys = f.Keys
		}
		if f.Values != nil {
			roles.Values = f.Values
		}
		roles.Layers = append(slices.Clone(roles.Layers), f.Layers...)
		c.Roles = &roles
	}
	sel, err := parseSelection(f.Selection)
	if err != nil {
		return Preset{}, err
	}
	c.Selection = sel
	if err := c.Validate(); err != nil {
		return Preset{}, fmt.Errorf("%w: %w", ErrPreset, err)
	}
	if f.Projection != nil {
		set, err := loadProjection(dir, f.Projection)
		if err != nil {
			return Preset{}, err
		}
		c.Projection = set
	}
	return p, nil
}

func setIf[T any](dst *T, v *T) {
	if v != nil {
		*dst = *v
	}
}

// CodecFlags are the command-line flags that set codec parameters, in the
// order ApplyFlags reads them.
var CodecFlags = []string{"group-size", "sparsity", "scheme", "rotate", "key-axis", "sink", "bits", "key-bits", "value-bits", "entropy"}

// ApplyFlags returns the preset's configuration with every codec flag the
// user set (isSet reports which) taken from flags instead, and the names of
// the flags that changed a value (a flag repeating the preset's value is not
// a change). What is not a codec parameter (Workers, MaxMemory, NoSync,
// ExactMetrics) always comes from flags.
func (p Preset) ApplyFlags(flags Config, isSet func(name string) bool) (Config, []string) {
	c := p.Config
	c.Workers, c.MaxMemory, c.NoSync, c.ExactMetrics = flags.Workers, flags.MaxMemory, flags.NoSync, flags.ExactMetrics
	var changed []string
	for _, name := range CodecFlags {
		if !isSet(name) {
			continue
		}
		before := c
		switch name {
		case "group-size":
			c.GroupSize = flags.GroupSize
		case "sparsity":
			c.Sparsity = flags.Sparsity
		case "scheme":
			c.Scheme = flags.Scheme
		case "rotate":
			c.Rotate = flags.Rotate
		case "key-axis":
			c.KeyAxis = flags.KeyAxis
		case "sink":
			c.Sink = flags.Sink
		case "bits":
			c.Bits = flags.Bits
		case "key-bits":
			c.KeyBits = flags.KeyBits
		case "value-bits":
			c.ValueBits = flags.ValueBits
		case "entropy":
			c.Entropy = flags.Entropy
		}
		if newCodec(before) != newCodec(c) {
			changed = append(changed, "--"+name)
		}
	}
	return c, changed
}

// PresetInfo describes a built-in preset for `kv-compress version`.
type PresetInfo struct {
	Name        string `json:"name"`
	Description string `json:"description"`
	Codec       Codec  `json:"codec"`
}

// PresetList describes every built-in preset with the codec record it writes.
func PresetList() []PresetInfo {
	var out []PresetInfo
	for _, p := range Presets() {
		out = append(out, PresetInfo{Name: p.Name, Description: p.Description, Codec: newCodec(p.Config)})
	}
	return out
}
