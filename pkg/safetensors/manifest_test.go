package safetensors

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"strings"
	"testing"
)

// manifestEntry describes one tensor of a Python-written file, as recorded by
// the generator script: enough to check that Go reads what Python wrote.
type manifestEntry struct {
	DType  string  `json:"dtype"`
	Shape  []int64 `json:"shape"`
	SHA256 string  `json:"sha256"`
}

type manifest struct {
	Metadata map[string]string        `json:"metadata"`
	Tensors  map[string]manifestEntry `json:"tensors"`
}

func checkManifest(t *testing.T, path string, f *File) {
	t.Helper()
	raw, err := os.ReadFile(strings.TrimSuffix(path, ".safetensors") + ".json")
	if err != nil {
		t.Fatalf("manifest: %v", err)
	}
	var m manifest
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatalf("manifest: %v", err)
	}
	if len(m.Tensors) != len(f.Tensors) {
		t.Fatalf("%d tensors, manifest lists %d", len(f.Tensors), len(m.Tensors))
	}
	for k, v := range m.Metadata {
		if f.Metadata[k] != v {
			t.Errorf("metadata %q = %q, want %q", k, f.Metadata[k], v)
		}
	}
	for name, want := range m.Tensors {
		got, ok := f.Lookup(name)
		if !ok {
			t.Errorf("missing tensor %q", name)
			continue
		}
		sum := sha256.Sum256(got.Data)
		if string(got.DType) != want.DType || hex.EncodeToString(sum[:]) != want.SHA256 || len(got.Shape) != len(want.Shape) {
			t.Errorf("tensor %q: %s %v, manifest %s %v", name, got.DType, got.Shape, want.DType, want.Shape)
			continue
		}
		for i := range want.Shape {
			if got.Shape[i] != want.Shape[i] {
				t.Errorf("tensor %q: shape %v, manifest %v", name, got.Shape, want.Shape)
			}
		}
	}
}
