package compression

import (
	"bytes"
	"encoding/json"
	"errors"
	"maps"
	"slices"
	"strings"
	"testing"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// TestParsePresetSelection: the valid forms of a preset's "selection"
// object come back field for field, and leave the codec as the base has it.
func TestParsePresetSelection(t *testing.T) {
	f := func(v float64) *float64 { return &v }
	n := func(v int) *int { return &v }
	tests := []struct {
		name, json string
		want       *PresetSelection
	}{
		{"no selection", `{"name":"x"}`, nil},
		{"null", `{"selection":null}`, nil},
		{"one keep ratio", `{"selection":{"method":"attention","keep_ratio":0.5}}`, &PresetSelection{Method: "attention", KeepRatio: f(0.5)}},
		{"keep everything", `{"selection":{"method":"recent","keep_ratio":1}}`, &PresetSelection{Method: "recent", KeepRatio: f(1)}},
		{"per layer", `{"selection":{"method":"knorm","keep_ratios":[1,0.25,0.125]}}`, &PresetSelection{Method: "knorm", KeepRatios: []float64{1, 0.25, 0.125}}},
		{"window and min_tokens", `{"base":"compact","selection":{"method":"attention","keep_ratios":[0.5],"window":64,"min_tokens":8}}`,
			&PresetSelection{Method: "attention", KeepRatios: []float64{0.5}, Window: n(64), MinTokens: n(8)}},
		{"smallest window", `{"selection":{"method":"attention","keep_ratio":0.001,"window":1,"min_tokens":1}}`,
			&PresetSelection{Method: "attention", KeepRatio: f(0.001), Window: n(1), MinTokens: n(1)}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p, err := ParsePreset([]byte(tc.json))
			if err != nil {
				t.Fatal(err)
			}
			got, _ := json.Marshal(p.Config.Selection)
			want, _ := json.Marshal(tc.want)
			if !bytes.Equal(got, want) {
				t.Fatalf("selection %s, want %s", got, want)
			}
			if tc.want == nil && p.Config.Selection != nil {
				t.Fatalf("selection %+v, want none", p.Config.Selection)
			}
			var doc map[string]any
			json.Unmarshal([]byte(tc.json), &doc)
			delete(doc, "selection")
			rest, _ := json.Marshal(doc)
			base, err := ParsePreset(rest)
			if err != nil {
				t.Fatal(err)
			}
			if got, want := newCodec(p.Config), newCodec(base.Config); !codecEqual(got, want) {
				t.Fatalf("the selection changed the codec record: %+v, want %+v", got, want)
			}
		})
	}
}

// codecEqual compares two codec records as the container holds them.
func codecEqual(a, b Codec) bool {
	x, _ := json.Marshal(a)
	y, _ := json.Marshal(b)
	return bytes.Equal(x, y)
}

// TestParsePresetSelectionRejects: every malformed "selection" is refused
// with ErrPreset and a message naming the field and the value received.
func TestParsePresetSelectionRejects(t *testing.T) {
	many := "[" + strings.Repeat("0.5,", MaxSelectionLayers) + "0.5]"
	tests := []struct {
		name, sel string
		want      []string // substrings of the error
	}{
		{"unknown method", `{"method":"h2o","keep_ratio":0.5}`, []string{"selection.method", "[attention knorm recent snapkv]", `"h2o"`}},
		{"no method", `{"keep_ratio":0.5}`, []string{"selection.method", `got ""`}},
		{"neither ratio", `{"method":"knorm"}`, []string{"keep_ratio", "keep_ratios", "neither"}},
		{"both ratios", `{"method":"knorm","keep_ratio":0.5,"keep_ratios":[0.5]}`, []string{"keep_ratio", "keep_ratios", "both"}},
		{"ratio 0", `{"method":"knorm","keep_ratio":0}`, []string{"selection.keep_ratio", "(0, 1]", "got 0"}},
		{"ratio 1.5", `{"method":"knorm","keep_ratio":1.5}`, []string{"selection.keep_ratio", "got 1.5"}},
		{"negative ratio", `{"method":"knorm","keep_ratio":-0.25}`, []string{"selection.keep_ratio", "got -0.25"}},
		{"empty list", `{"method":"knorm","keep_ratios":[]}`, []string{"selection.keep_ratios", "got 0"}},
		{"too many layers", `{"method":"knorm","keep_ratios":` + many + `}`, []string{"selection.keep_ratios", "65536", "got 65537"}},
		{"ratio 0 in the list", `{"method":"recent","keep_ratios":[0.5,0]}`, []string{"selection.keep_ratios[1]", "got 0"}},
		{"ratio above 1 in the list", `{"method":"recent","keep_ratios":[1.01]}`, []string{"selection.keep_ratios[0]", "got 1.01"}},
		{"null in the list", `{"method":"recent","keep_ratios":[0.5,null]}`, []string{"selection.keep_ratios[1]"}},
		{"window 0", `{"method":"attention","keep_ratio":0.5,"window":0}`, []string{"selection.window", "got 0"}},
		{"negative min_tokens", `{"method":"attention","keep_ratio":0.5,"min_tokens":-3}`, []string{"selection.min_tokens", "got -3"}},
		{"huge window", `{"method":"attention","keep_ratio":0.5,"window":4294967296}`, []string{"selection.window", "got 4294967296"}},
		{"unknown field", `{"method":"attention","keep_ratio":0.5,"attention_threshold":0.9}`, []string{"selection", `"attention_threshold"`}},
		{"ratio as a string", `{"method":"attention","keep_ratio":"0.5"}`, []string{"selection", "keep_ratio"}},
		{"ratios as a number", `{"method":"attention","keep_ratios":0.5}`, []string{"selection", "keep_ratios"}},
		{"fractional window", `{"method":"attention","keep_ratio":0.5,"window":2.5}`, []string{"selection", "window"}},
		{"boolean min_tokens", `{"method":"attention","keep_ratio":0.5,"min_tokens":true}`, []string{"selection", "min_tokens"}},
		{"method as a number", `{"method":1,"keep_ratio":0.5}`, []string{"selection", "method"}},
		{"not an object", `[0.5]`, []string{"selection"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParsePreset([]byte(`{"selection":` + tc.sel + `}`))
			if !errors.Is(err, ErrPreset) {
				t.Fatalf("err = %v, want %v", err, ErrPreset)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Fatalf("err %q does not say %q", err, w)
				}
			}
			if strings.Contains(err.Error(), "\n") {
				t.Fatalf("err %q spans lines", err)
			}
		})
	}
}

// TestPresetSelectionReport: a preset selection leaves the container byte
// for byte as the same preset without it writes; the report carries the
// selection and whether the input had positions tensors; per-layer ratios
// that do not match the input's layers with positions are refused.
func TestPresetSelectionReport(t *testing.T) {
	selected := selectedCache(t, 3, 2, 20, 64, 40, 71)
	plain := kvCache(t, 3, 2, 40, 64, safetensors.F16, 72)
	tests := []struct {
		name     string
		src      *safetensors.File
		sel      string
		selected bool
		err      string // "" for success
	}{
		{"no positions, one ratio", plain, `{"method":"attention","keep_ratio":0.5}`, false, ""},
		{"no positions, ratios for any layer count", plain, `{"method":"knorm","keep_ratios":[0.5,0.5,0.5,0.5,0.5]}`, false, ""},
		{"positions, one ratio", selected, `{"method":"attention","keep_ratio":0.25,"window":8}`, true, ""},
		{"positions, one ratio per layer", selected, `{"method":"recent","keep_ratios":[0.5,0.5,0.25],"min_tokens":4}`, true, ""},
		{"positions, too many ratios", selected, `{"method":"recent","keep_ratios":[0.5,0.5,0.5,0.5]}`, true, `preset "tuned": selection.keep_ratios has 4 ratios (layers 0 to 3) but the input has no layer_3_positions`},
		{"positions, too few ratios", selected, `{"method":"recent","keep_ratios":[0.5,0.5]}`, true, `preset "tuned": selection.keep_ratios has 2 ratios (layers 0 to 1) but the input has layer_2_positions`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			without, err := ParsePreset([]byte(`{"name":"tuned","base":"compact"}`))
			if err != nil {
				t.Fatal(err)
			}
			with, err := ParsePreset([]byte(`{"name":"tuned","base":"compact","selection":` + tc.sel + `}`))
			if err != nil {
				t.Fatal(err)
			}
			ref, err := Compress(tc.src, without.Config)
			if err != nil {
				t.Fatal(err)
			}
			res, err := Compress(tc.src, with.Config)
			if tc.err != "" {
				if !errors.Is(err, ErrSelection) || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want %v saying %q", err, ErrSelection, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !maps.Equal(res.Metadata, ref.Metadata) || len(res.Tensors) != len(ref.Tensors) {
				t.Fatalf("the selection changed the container's metadata")
			}
			for i := range res.Tensors {
				if !bytes.Equal(res.Tensors[i].Data, ref.Tensors[i].Data) {
					t.Fatalf("the selection changed payload %s", res.Tensors[i].Name)
				}
			}
			r := NewReport(res, 1, 1, 1)
			doc, _ := json.Marshal(r)
			var back struct {
				Sel      json.RawMessage `json:"preset_selection"`
				Selected *bool           `json:"input_selected"`
			}
			json.Unmarshal(doc, &back)
			var want bytes.Buffer
			json.Compact(&want, []byte(tc.sel))
			if string(back.Sel) != want.String() || back.Selected == nil || *back.Selected != tc.selected {
				t.Fatalf("report preset_selection %s input_selected %v, want %s and %v", back.Sel, back.Selected, want.String(), tc.selected)
			}
			if doc, _ := json.Marshal(NewReport(ref, 1, 1, 1)); bytes.Contains(doc, []byte("preset_selection")) || bytes.Contains(doc, []byte("input_selected")) {
				t.Fatalf("a preset without selection reports one: %s", doc)
			}
		})
	}
}

// FuzzParsePreset: any preset file either parses into a configuration that
// validates, with a selection that encodes and parses back to itself, or is
// refused with ErrPreset in one line; never a panic.
func FuzzParsePreset(f *testing.F) {
	for _, s := range []string{
		`{}`, `{"base":"seed","codec":{"bits":3}}`, `{"keys":{"axis":"channel","group_size":256}}`,
		`{"layers":[{"layers":[0,1],"values":{"bits":8}}]}`,
		`{"selection":{"method":"attention","keep_ratio":0.5}}`,
		`{"selection":{"method":"knorm","keep_ratios":[1,0.5,0.25],"window":32,"min_tokens":16}}`,
		`{"selection":{"method":"recent","keep_ratio":0,"keep_ratios":[2]}}`, `{"selection":null}`, `{"selection":{}}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		if bytes.Contains(raw, []byte(`"projection"`)) {
			return // names files: covered by the projection tests
		}
		p, err := ParsePresetIn(raw, t.TempDir())
		if err != nil {
			if !errors.Is(err, ErrPreset) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("err %q: want %v in one line", err, ErrPreset)
			}
			return
		}
		if err := p.Config.Validate(); err != nil {
			t.Fatalf("parsed preset does not validate: %v", err)
		}
		if s := p.Config.Selection; s != nil {
			doc, _ := json.Marshal(map[string]any{"selection": s})
			again, err := ParsePreset(doc)
			if err != nil {
				t.Fatalf("selection %s does not parse back: %v", doc, err)
			}
			a, _ := json.Marshal(again.Config.Selection)
			b, _ := json.Marshal(s)
			if !bytes.Equal(a, b) || !slices.Contains(SelectionMethods, s.Method) {
				t.Fatalf("selection %s parses back as %s", b, a)
			}
		}
	})
}
