package main

import (
	"encoding/binary"
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
