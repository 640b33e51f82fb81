package main

import (
	"encoding/binary"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// TestSelectionInputExit3: a token-selected cache whose indices are out of
// range, unsorted or repeated is refused by compress with exit 3, one JSON
// object, an error naming the file and the tensor, and no output file; the
// intact one round-trips its positions.
func TestSelectionInputExit3(t *testing.T) {
	dir := t.TempDir()
	src, err := safetensors.ReadFile(golden + "selected_f16.safetensors")
	if err != nil {
		t.Fatal(err)
	}
	set := func(j int, v uint32) func([]byte) {
		return func(b []byte) { binary.LittleEndian.PutUint32(b[4*j:], v) }
	}
	tests := []struct {
		name   string
		mutate func(b []byte) // edits layer_1_positions' bytes
		code   int
		stderr string
	}{
		{"intact", func([]byte) {}, 0, ""},
		{"out of range", set(3, 48), 3, "outside [0, 48)"},
		{"negative", set(0, 0xffffffff), 3, "outside [0, 48)"},
		{"unsorted", func(b []byte) { copy(b[0:4], b[8:12]) }, 3, "not sorted"},
		{"duplicated", func(b []byte) { copy(b[4:8], b[0:4]) }, 3, "repeats position"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tensors := make([]safetensors.Tensor, len(src.Tensors))
			for i, tn := range src.Tensors {
				tn.Data = append([]byte(nil), tn.Data...)
				if tn.Name == "layer_1_positions" {
					tc.mutate(tn.Data)
				}
				tensors[i] = tn
			}
			in := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "_")+".safetensors")
			if err := safetensors.WriteFile(in, tensors, src.Metadata); err != nil {
				t.Fatal(err)
			}
			out := in + ".kvc"
			code, doc, stderr := runCLI(t, "compress", "-i", in, "-o", out)
			if code != tc.code {
				t.Fatalf("exit %d, want %d (%s)", code, tc.code, stderr)
			}
			if tc.code != 0 {
				if !strings.Contains(stderr, in) || !strings.Contains(stderr, "layer_1_positions") || !strings.Contains(stderr, tc.stderr) {
					t.Fatalf("stderr %q does not name the file, the tensor and %q", stderr, tc.stderr)
				}
				if doc["exit_code"] != float64(3) {
					t.Fatalf("JSON %v", doc)
				}
				if _, err := os.Stat(out); !os.IsNotExist(err) {
					t.Fatalf("a refused compress left %s", out)
				}
				return
			}
			restored := filepath.Join(dir, "restored.safetensors")
			if code, _, stderr := runCLI(t, "decompress", "-i", out, "-o", restored); code != 0 {
				t.Fatalf("decompress: exit %d (%s)", code, stderr)
			}
			back, err := safetensors.ReadFile(restored)
			if err != nil {
				t.Fatal(err)
			}
			got, _ := back.Lookup("layer_1_positions")
			want, _ := src.Lookup("layer_1_positions")
			if got == nil || string(got.Data) != string(want.Data) || got.DType != safetensors.I32 {
				t.Fatalf("positions did not come back")
			}
			if back.Metadata["context_length"] != "48" {
				t.Fatalf("metadata %v", back.Metadata)
			}
		})
	}
}

// TestPresetSelection: a preset file with a "selection" object runs metrics
// and compress, reports the selection and whether the input was selected,
// writes the same container as without it, refuses per-layer ratios that do
// not match the input's layers with positions (exit 3, naming the input and
// the layer), and a malformed selection (exit 2, naming the preset file).
func TestPresetSelection(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	plainPreset := write("plain.json", `{"name":"tuned","base":"compact"}`)
	uniform := write("uniform.json", `{"name":"tuned","base":"compact","selection":{"method":"attention","keep_ratio":0.5,"window":32,"min_tokens":16}}`)
	perLayer := write("per-layer.json", `{"name":"tuned","base":"compact","selection":{"method":"knorm","keep_ratios":[0.5,0.25]}}`)
	threeLayers := write("three.json", `{"name":"tuned","base":"compact","selection":{"method":"knorm","keep_ratios":[0.5,0.5,0.5]}}`)
	badRatio := write("bad.json", `{"selection":{"method":"knorm","keep_ratio":1.5}}`)
	selected, plain := golden+"selected_f16.safetensors", golden+"cache_f16.safetensors"

	tests := []struct {
		name, in, preset string
		code             int
		selected         bool
		stderr           []string
	}{
		{"uniform ratio on a selected cache", selected, uniform, 0, true, nil},
		{"per-layer ratios on a selected cache", selected, perLayer, 0, true, nil},
		{"per-layer ratios on a cache without positions", plain, threeLayers, 0, false, nil},
		{"more ratios than layers with positions", selected, threeLayers, 3, false, []string{selected, `preset "tuned": selection.keep_ratios has 3 ratios`, "no layer_2_positions"}},
		{"ratio out of range", selected, badRatio, 2, false, []string{badRatio, "selection.keep_ratio must be in (0, 1], got 1.5"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			for _, cmd := range []string{"metrics", "compress"} {
				args := []string{cmd, "-i", tc.in, "--preset", tc.preset}
				out := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "_")+"."+cmd+".kvc")
				if cmd == "compress" {
					args = append(args, "-o", out)
				}
				code, doc, stderr := runCLI(t, args...)
				if code != tc.code {
					t.Fatalf("%s: exit %d, want %d (%s)", cmd, code, tc.code, stderr)
				}
				if tc.code != 0 {
					for _, w := range tc.stderr {
						if !strings.Contains(stderr, w) || strings.Count(strings.TrimSpace(stderr), "\n") != 0 {
							t.Fatalf("%s: stderr %q, want one line saying %q", cmd, stderr, w)
						}
					}
					if doc["exit_code"] != float64(tc.code) {
						t.Fatalf("%s: JSON %v", cmd, doc)
					}
					if _, err := os.Stat(out); !os.IsNotExist(err) {
						t.Fatalf("a refused compress left %s", out)
					}
					continue
				}
				raw, _ := os.ReadFile(tc.preset)
				var file struct{ Selection map[string]any }
				json.Unmarshal(raw, &file)
				got, _ := json.Marshal(doc["preset_selection"])
				want, _ := json.Marshal(file.Selection)
				if string(got) != string(want) || doc["input_selected"] != tc.selected {
					t.Fatalf("%s: preset_selection %s input_selected %v, want %s and %v", cmd, got, doc["input_selected"], want, tc.selected)
				}
				if cmd != "compress" {
					continue
				}
				ref := filepath.Join(dir, "ref.kvc")
				code, refDoc, stderr := runCLI(t, "compress", "-i", tc.in, "-o", ref, "--preset", plainPreset)
				if code != 0 {
					t.Fatalf("compress without selection: exit %d (%s)", code, stderr)
				}
				if _, ok := refDoc["preset_selection"]; ok {
					t.Fatalf("a preset without selection reports one: %v", refDoc["preset_selection"])
				}
				if _, ok := refDoc["input_selected"]; ok {
					t.Fatalf("a preset without selection reports input_selected")
				}
				a, _ := os.ReadFile(out)
				b, _ := os.ReadFile(ref)
				if len(a) == 0 || string(a) != string(b) {
					t.Fatalf("the preset's selection changed the container (%d vs %d bytes)", len(a), len(b))
				}
			}
		})
	}
}
