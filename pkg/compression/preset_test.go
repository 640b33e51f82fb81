package compression

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

func TestBuiltinPresetsCompress(t *testing.T) {
	src := kvCache(t, 2, 2, 300, 64, safetensors.F16, 31)
	for _, p := range Presets() {
		t.Run(p.Name, func(t *testing.T) {
			res, err := Compress(src, p.Config)
			if err != nil {
				t.Fatal(err)
			}
			if res.Codec.Preset != p.Name {
				t.Fatalf("codec records preset %q, want %q", res.Codec.Preset, p.Name)
			}
			if r := NewReport(res, 1, 1, 1); r.Preset != p.Name {
				t.Fatalf("report names preset %q", r.Preset)
			}
			for stage := range res.Stages {
				if p.Name == PresetSeed && stage != EncodingLZ4 && stage != EncodingStored {
					t.Fatalf("the seed preset used stage %q; it is LZ4 or stored", stage)
				}
			}
			if _, err := Decompress(asContainer(t, res), 1); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestParsePresetRejects(t *testing.T) {
	tests := []struct {
		name, json, field string
	}{
		{"unknown field", `{"codec":{"group":64}}`, `"group"`},
		{"unknown base", `{"base":"tiny"}`, "base"},
		{"bad key scheme", `{"keys":{"scheme":"nf4"}}`, "keys.scheme"},
		{"bad value bits", `{"values":{"bits":5}}`, "values.bits"},
		{"long groups along head_dim", `{"values":{"group_size":256}}`, "values.group_size"},
		{"bad group size", `{"keys":{"axis":"channel","group_size":100}}`, "keys.group_size"},
		{"bad axis", `{"keys":{"axis":"seq"}}`, "keys.axis"},
		{"negative sink", `{"keys":{"sink":-1}}`, "keys.sink"},
		{"layer plan without layers", `{"layers":[{"keys":{"bits":8}}]}`, "layers[0].layers"},
		{"layer plan with a bad field", `{"layers":[{"layers":[1],"values":{"rotate":"fft"}}]}`, "layers[0].values.rotate"},
		{"bad codec group size", `{"codec":{"group_size":48}}`, "group size"},
		{"bad entropy", `{"codec":{"entropy":"brotli"}}`, "entropy"},
		{"two documents", `{} {}`, "more than one"},
		{"not json", `name: x`, "invalid character"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParsePreset([]byte(tc.json))
			if !errors.Is(err, ErrPreset) || !strings.Contains(err.Error(), tc.field) {
				t.Fatalf("err = %v, want %v naming %q", err, ErrPreset, tc.field)
			}
		})
	}
}

func TestLoadPreset(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "p.json")
	if err := os.WriteFile(file, []byte(`{"name":"mine","base":"seed","codec":{"bits":3},"keys":{"bits":4}}`), 0o644); err != nil {
		t.Fatal(err)
	}
	p, err := LoadPreset(file)
	if err != nil {
		t.Fatal(err)
	}
	if p.Name != "mine" || p.Config.Entropy != EntropyLZ4 || p.Config.Bits != 3 || p.Config.Roles.Keys.Bits != 4 {
		t.Fatalf("preset %+v, config %+v", p, p.Config)
	}
	if _, err := LoadPreset("fastest"); !errors.Is(err, ErrPreset) || !strings.Contains(err.Error(), "built-in preset") {
		t.Fatalf("unknown name: %v", err)
	}
	if _, err := LoadPreset(filepath.Join(dir, "missing.json")); !errors.Is(err, ErrPreset) {
		t.Fatalf("missing file: %v", err)
	}
}

// TestRolePlansReachEntries checks that role and layer plans land in the
// right tensors' entries and that the container restores with them.
func TestRolePlansReachEntries(t *testing.T) {
	src := kvCache(t, 3, 2, 300, 64, safetensors.F16, 32)
	four := 4
	cfg := DefaultConfig()
	cfg.Roles = &RolePlans{
		Keys:   &RolePlan{Scheme: SchemeAsym, Rotate: RotateNone, Axis: KeyAxisChannel, GroupSize: 256},
		Values: &RolePlan{Bits: 3, GroupSize: 32},
		Layers: []LayerPlan{{Layers: []int{1}, Keys: &RolePlan{Bits: 8, Sink: &four}, Values: &RolePlan{Axis: KeyAxisChannel, GroupSize: 512}}},
	}
	res, err := Compress(src, cfg)
	if err != nil {
		t.Fatal(err)
	}
	container := asContainer(t, res)
	idx, err := ReadIndex(container)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]struct {
		mode, scheme, axis, rotate string
		sink, group                int
	}{
		"layer_0_key":   {"int4", SchemeAsym, AxisSeq, RotateNone, 1, 256},
		"layer_0_value": {"int3", SchemeSym, AxisLast, RotateHadamard, 1, 32},
		"layer_1_key":   {"int8", SchemeAsym, AxisSeq, RotateNone, 4, 256},
		"layer_1_value": {"int3", SchemeSym, AxisSeq, RotateHadamard, 1, 512},
		"layer_2_key":   {"int4", SchemeAsym, AxisSeq, RotateNone, 1, 256},
	}
	for _, e := range idx.Entries {
		w, ok := want[e.Name]
		if !ok {
			continue
		}
		p := e.plan(idx.Codec.GroupSize)
		if e.Mode != w.mode || p.Scheme != w.scheme || p.Axis != w.axis || p.Rotate != w.rotate || p.Sink != w.sink || p.Group != w.group {
			t.Errorf("%s: mode %s plan %+v, want %+v", e.Name, e.Mode, p, w)
		}
	}
	if idx.Codec.Roles == nil || idx.Codec.Roles.Keys.GroupSize != 256 {
		t.Fatalf("codec record lost the role plans: %+v", idx.Codec)
	}
	if _, err := Decompress(container, 2); err != nil {
		t.Fatal(err)
	}
}

// TestLongChannelGroupsMatchScalar runs per-channel keys with groups longer
// than 128 through the vector and the scalar encoders: identical bytes.
func TestLongChannelGroupsMatchScalar(t *testing.T) {
	for _, g := range []int{256, 1024} {
		cfg := DefaultConfig()
		cfg.Roles = &RolePlans{Keys: &RolePlan{Axis: KeyAxisChannel, GroupSize: g}}
		f := rowsTestFile(t, safetensors.F16, 300, 64)
		vec, scalar, vecErr, scalarErr := compressBoth(t, f, cfg)
		if vecErr != nil || scalarErr != nil {
			t.Fatalf("G%d: %v / %v", g, vecErr, scalarErr)
		}
		for i := range vec.Tensors {
			if !bytes.Equal(vec.Tensors[i].Data, scalar.Tensors[i].Data) {
				t.Fatalf("G%d: payload %s differs from the scalar encoder's", g, vec.Tensors[i].Name)
			}
		}
		v, s := decompressBoth(t, vec)
		for i := range v.Tensors {
			if !bytes.Equal(v.Tensors[i].Data, s.Tensors[i].Data) {
				t.Fatalf("G%d: restored %s differs from the scalar decoder's", g, v.Tensors[i].Name)
			}
		}
	}
}

func TestApplyFlags(t *testing.T) {
	p, _ := LoadPreset(PresetSeed)
	flags := DefaultConfig()
	flags.Bits, flags.Workers, flags.MaxMemory, flags.NoSync, flags.ExactMetrics = 3, 2, 1<<20, true, true
	c, changed := p.ApplyFlags(flags, func(name string) bool { return name == "bits" })
	if c.Bits != 3 || c.Workers != 2 || c.MaxMemory != 1<<20 || !c.NoSync || !c.ExactMetrics || c.Entropy != EntropyLZ4 || c.Rotate != RotateNone || len(changed) != 1 || changed[0] != "--bits" {
		t.Fatalf("config %+v, changed %v", c, changed)
	}
}
