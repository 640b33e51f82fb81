package compression

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// MaxBasesFileSize bounds a bases file named by a preset (1 GiB).
const MaxBasesFileSize = 1 << 30

// projectionFile is the "projection" object of a preset file (docs/cli.md):
// the bases file, its SHA-256, and the calibration's description.
type projectionFile struct {
	// Bases is the safetensors file holding the bases, relative to the preset file.
	Bases string `json:"bases"`
	// SHA256 is the bases file's hex SHA-256; a different file is refused.
	SHA256 string `json:"sha256"`
	// Model, HeadDim, NLayers and NKVHeads describe the cache it was calibrated on.
	Model    string `json:"model"`
	HeadDim  int    `json:"head_dim"`
	NLayers  int    `json:"n_layers"`
	NKVHeads int    `json:"n_kv_heads"`
	// Rank is the rank asked for (0 when chosen by Energy), Energy the explained-energy target (0 when by rank).
	Rank   int     `json:"rank"`
	Energy float64 `json:"energy"`
	// Layers lists each layer's ranks (0: identity), as the bases file holds them.
	Layers []projectionLayer `json:"layers"`
	// Calibration describes the data and windows the bases came from (free form).
	Calibration json.RawMessage `json:"calibration"`
}

// projectionLayer is one layer's ranks in a preset's "projection" object.
type projectionLayer struct {
	Layer  int `json:"layer"`
	Keys   int `json:"keys"`
	Values int `json:"values"`
}

var basisName = regexp.MustCompile(`^(layer_(0|[1-9][0-9]*)_(key|value))\.(basis|mean)$`)

// loadProjection reads and checks the bases file a preset names. Errors wrap
// ErrProjection (exit 3) for a file that is not a valid bases set.
func loadProjection(dir string, pf *projectionFile) (*ProjectionSet, error) {
	if pf.Bases == "" {
		return nil, fmt.Errorf("%w: projection.bases must name the bases file", ErrPreset)
	}
	if len(pf.SHA256) != 64 || strings.ToLower(pf.SHA256) != pf.SHA256 {
		return nil, fmt.Errorf("%w: projection.sha256 must be 64 lower-case hex digits, got %q", ErrPreset, pf.SHA256)
	}
	path := pf.Bases
	if !filepath.IsAbs(path) {
		path = filepath.Join(dir, path)
	}
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("projection bases: %w", err)
	}
	if !st.Mode().IsRegular() || st.Size() > MaxBasesFileSize {
		return nil, fmt.Errorf("%w: %s: not a regular file of at most %d bytes", ErrProjection, path, MaxBasesFileSize)
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("projection bases: %w", err)
	}
	if sum := sha256.Sum256(raw); hex.EncodeToString(sum[:]) != pf.SHA256 {
		return nil, fmt.Errorf("%w: %s has SHA-256 %s, the preset says %s", ErrProjection, path, hex.EncodeToString(sum[:]), pf.SHA256)
	}
	f, err := safetensors.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrProjection, path, err)
	}
	set, err := projectionSetOf(f, pf)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	set.File, set.SHA256 = filepath.Base(pf.Bases), pf.SHA256
	return set, nil
}

// projectionSetOf builds the bases of a parsed bases file: for each projected
// tensor NAME, NAME.basis [heads, head_dim, rank] and NAME.mean [heads,
// head_dim], of one dtype (F16 or F32); nothing else.
func projectionSetOf(f *safetensors.File, pf *projectionFile) (*ProjectionSet, error) {
	pairs := map[string][2]*safetensors.Tensor{}
	for i := range f.Tensors {
		t := &f.Tensors[i]
		m := basisName.FindStringSubmatch(t.Name)
		if m == nil {
			return nil, fmt.Errorf("%w: tensor %q (want layer_{i}_key|value.basis|mean)", ErrProjection, t.Name)
		}
		p := pairs[m[1]]
		if m[4] == "basis" {
			p[0] = t
		} else {
			p[1] = t
		}
		pairs[m[1]] = p
	}
	ranks := map[string]int{}
	for _, l := range pf.Layers {
		if l.Layer < 0 || l.Keys < 0 || l.Values < 0 {
			return nil, fmt.Errorf("%w: projection.layers: layer %d with ranks %d and %d (want >= 0)", ErrPreset, l.Layer, l.Keys, l.Values)
		}
		ranks[fmt.Sprintf("layer_%d_key", l.Layer)] = l.Keys
		ranks[fmt.Sprintf("layer_%d_value", l.Layer)] = l.Values
	}
	set := &ProjectionSet{Bases: map[string]*ProjectionBasis{}}
	for name, p := range pairs {
		basis, mean := p[0], p[1]
		if basis == nil || mean == nil {
			return nil, fmt.Errorf("%w: %s needs both .basis and .mean", ErrProjection, name)
		}
		if len(basis.Shape) != 3 || len(mean.Shape) != 2 || basis.DType != mean.DType ||
			basis.Shape[0] != mean.Shape[0] || basis.Shape[1] != mean.Shape[1] {
			return nil, fmt.Errorf("%w: %s: basis %s %v and mean %s %v (want [heads, head_dim, rank] and [heads, head_dim], one dtype)",
				ErrProjection, name, basis.DType, basis.Shape, mean.DType, mean.Shape)
		}
		heads, dim, rank := basis.Shape[0], basis.Shape[1], basis.Shape[2]
		if heads > 1<<16 || dim > 1<<16 || rank > dim {
			return nil, fmt.Errorf("%w: %s: %d heads, head_dim %d, rank %d (want rank <= head_dim <= 65536)", ErrProjection, name, heads, dim, rank)
		}
		if pf.HeadDim != 0 && dim != int64(pf.HeadDim) || pf.NKVHeads != 0 && heads != int64(pf.NKVHeads) {
			return nil, fmt.Errorf("%w: %s: %d heads of head_dim %d; the preset says %d heads of %d", ErrProjection, name, heads, dim, pf.NKVHeads, pf.HeadDim)
		}
		if want, ok := ranks[name]; len(pf.Layers) > 0 && (!ok || int64(want) != rank) {
			return nil, fmt.Errorf("%w: %s has rank %d; projection.layers says %d", ErrProjection, name, rank, want)
		}
		b, err := NewProjectionBasis(int(heads), int(dim), int(rank), basis.DType, basis.Data, mean.Data)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		set.Bases[name] = b
	}
	for name, r := range ranks {
		if _, ok := set.Bases[name]; r > 0 && !ok {
			return nil, fmt.Errorf("%w: projection.layers gives %s rank %d; the bases file has no basis for it", ErrProjection, name, r)
		}
	}
	return set, nil
}
