package compression

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// Golden containers (testdata/golden/containers) are whole container files
// written by a released build of each format version, with the SHA-256 of the
// file and of every restored tensor. They are never rewritten: a version that
// was once released keeps decoding to the same bytes forever. vN.json lists
// the containers of version N; tests/test_golden.py reads the same manifests.

// goldenContainer is one entry of a vN.json manifest.
type goldenContainer struct {
	Container       string            `json:"container"`
	Input           string            `json:"input"`
	Flags           []string          `json:"flags"`
	ContainerSHA256 string            `json:"container_sha256"`
	Reconstruction  map[string]string `json:"reconstruction_sha256"`
}

type goldenContainerManifest struct {
	FormatVersion int               `json:"format_version"`
	WrittenBy     string            `json:"written_by"`
	Cases         []goldenContainer `json:"cases"`
}

func readContainerManifests(t *testing.T) []goldenContainerManifest {
	t.Helper()
	paths, err := filepath.Glob(filepath.Join(goldenDir, "containers", "v*.json"))
	if err != nil || len(paths) == 0 {
		t.Fatalf("no golden container manifests in %s (%v)", goldenDir, err)
	}
	var out []goldenContainerManifest
	for _, p := range paths {
		raw, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		var m goldenContainerManifest
		if err := json.Unmarshal(raw, &m); err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		out = append(out, m)
	}
	return out
}

func sha256Hex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// TestGoldenContainersDecode restores every golden container of every format
// version and checks each tensor against the hash recorded when it was written.
func TestGoldenContainersDecode(t *testing.T) {
	versions := map[int]bool{}
	for _, m := range readContainerManifests(t) {
		versions[m.FormatVersion] = true
		for _, gc := range m.Cases {
			t.Run(filepath.Base(gc.Container), func(t *testing.T) {
				raw, err := os.ReadFile(filepath.Join(goldenDir, gc.Container))
				if err != nil {
					t.Fatal(err)
				}
				if got := sha256Hex(raw); got != gc.ContainerSHA256 {
					t.Fatalf("golden container changed on disk: sha256 %s, manifest %s (golden containers are never rewritten)", got, gc.ContainerSHA256)
				}
				f, err := safetensors.Parse(raw)
				if err != nil {
					t.Fatal(err)
				}
				idx, err := ReadIndex(f)
				if err != nil {
					t.Fatal(err)
				}
				if idx.Version != m.FormatVersion {
					t.Fatalf("container says version %d, manifest %d", idx.Version, m.FormatVersion)
				}
				restored, err := Decompress(f, 2)
				if err != nil {
					t.Fatal(err)
				}
				if len(restored.Tensors) != len(gc.Reconstruction) {
					t.Fatalf("%d tensors restored, manifest lists %d", len(restored.Tensors), len(gc.Reconstruction))
				}
				for _, rt := range restored.Tensors {
					if got, want := sha256Hex(rt.Data), gc.Reconstruction[rt.Name]; got != want {
						t.Errorf("tensor %q restores to sha256 %s, want %s", rt.Name, got, want)
					}
				}
			})
		}
	}
	if !versions[1] {
		t.Error("no version-1 golden containers: they must stay tested forever")
	}
}
