package compression

import (
	"encoding/json"
	"errors"
	"math"
	"strings"
	"testing"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// projectedContainer compresses a small cache whose values go through an
// F32 rank-8 basis, with every payload stored raw, so a test can rewrite them.
func projectedContainer(t testing.TB) (*Result, *safetensors.File) {
	t.Helper()
	const heads, dim, rank = 2, 32, 8
	basis, mean := orthoBasis(heads, dim, rank, safetensors.F32, 4)
	b, err := NewProjectionBasis(heads, dim, rank, safetensors.F32, f32Bytes(basis), f32Bytes(mean))
	if err != nil {
		t.Fatal(err)
	}
	cfg := DefaultConfig()
	cfg.Entropy = EntropyNone
	cfg.Roles = &RolePlans{Values: &RolePlan{Axis: KeyAxisChannel, Rotate: RotateNone}}
	cfg.Projection = &ProjectionSet{File: "b.safetensors", SHA256: strings.Repeat("a", 64), Bases: map[string]*ProjectionBasis{"layer_0_value": b}}
	src := kvCache(t, 1, heads, 40, dim, safetensors.F16, 9)
	res, err := Compress(src, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return res, asContainer(t, res)
}

// projectedFile is projectedContainer's container as a parsed file.
func projectedFile(tb testing.TB) *safetensors.File {
	_, f := projectedContainer(tb)
	return f
}

// rewriteEntry changes the value entry of a container's index (and, with
// payload, one payload's bytes and checksum) and re-signs the index.
func rewriteEntry(t *testing.T, f *safetensors.File, edit func(e map[string]any), payload string, data []byte) *safetensors.File {
	t.Helper()
	var entries []map[string]any
	if err := json.Unmarshal([]byte(f.Metadata[MetaTensors]), &entries); err != nil {
		t.Fatal(err)
	}
	tensors := append([]safetensors.Tensor(nil), f.Tensors...)
	for _, e := range entries {
		if e["name"] != "layer_0_value" {
			continue
		}
		if payload != "" {
			p := e["projection"].(map[string]any)[payload].(map[string]any)
			p["crc32c"] = checksum(data)
			for i := range tensors {
				if tensors[i].Name == p["tensor"] {
					tensors[i].Data = data
				}
			}
		}
		if edit != nil {
			edit(e)
		}
	}
	tj, _ := json.Marshal(entries)
	md := map[string]string{}
	for k, v := range f.Metadata {
		md[k] = v
	}
	md[MetaTensors] = string(tj)
	md[MetaIndexChecksum] = indexChecksum(md[MetaCodec], md[MetaTensors], md[MetaSourceMetadata])
	out, err := safetensors.Parse(encodeFile(t, &safetensors.File{Tensors: tensors, Metadata: md}))
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestProjectionContainerRefused(t *testing.T) {
	_, good := projectedContainer(t)
	if _, err := Decompress(good, 1); err != nil {
		t.Fatalf("the untouched container must decode: %v", err)
	}
	proj := func(f func(p map[string]any)) func(e map[string]any) {
		return func(e map[string]any) { f(e["projection"].(map[string]any)) }
	}
	basisBytes := func(v float32) []byte {
		raw := make([]float32, 2*32*8)
		raw[3] = v
		return f32Bytes(raw)
	}
	tests := []struct {
		name    string
		edit    func(e map[string]any)
		payload string
		data    []byte
		target  error
		say     string
	}{
		{"rank zero", proj(func(p map[string]any) { p["rank"] = 0 }), "", nil, ErrProjection, "rank 0"},
		{"rank beyond head_dim", proj(func(p map[string]any) { p["rank"] = 33 }), "", nil, ErrProjection, "rank 33"},
		{"huge rank", proj(func(p map[string]any) { p["rank"] = 1 << 40 }), "", nil, ErrProjection, "rank"},
		{"heads that do not fit", proj(func(p map[string]any) { p["heads"] = 3 }), "", nil, ErrProjection, "3 heads"},
		{"huge heads", proj(func(p map[string]any) { p["heads"] = 1 << 30 }), "", nil, ErrProjection, "basis elements"},
		{"heads that would wrap", proj(func(p map[string]any) { p["heads"] = int64(1) << 58 }), "", nil, ErrProjection, "basis elements"},
		{"bad dtype", proj(func(p map[string]any) { p["dtype"] = "F64" }), "", nil, ErrProjection, "dtype"},
		{"basis payload missing", proj(func(p map[string]any) { delete(p, "basis") }), "", nil, ErrCorrupt, "missing basis"},
		{"basis size lies", proj(func(p map[string]any) { p["basis"].(map[string]any)["raw_bytes"] = 12 }), "", nil, ErrCorrupt, "basis payload declares"},
		{"projection on a stored entry", func(e map[string]any) { e["mode"] = "stored" }, "", nil, ErrCorrupt, "stored entry"},
		{"nan in basis", nil, "basis", basisBytes(float32(math.NaN())), ErrProjection, "basis element 3"},
		{"basis beyond one", nil, "basis", basisBytes(1.5), ErrProjection, "[-1, 1]"},
		{"inf in mean", nil, "mean", f32Bytes(append(make([]float32, 63), float32(math.Inf(-1)))), ErrProjection, "mean element 63"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := rewriteEntry(t, good, tc.edit, tc.payload, tc.data)
			_, err := Decompress(f, 1)
			if !errors.Is(err, tc.target) || !strings.Contains(err.Error(), tc.say) {
				t.Fatalf("got %v, want %v saying %q", err, tc.target, tc.say)
			}
		})
	}
}

// TestProjectionEntryFieldsOptional: a container without projection decodes
// as before, and the projected one records its basis bytes by part.
func TestProjectionEntryFieldsOptional(t *testing.T) {
	src := kvCache(t, 1, 2, 40, 64, safetensors.F16, 2)
	res, err := Compress(src, DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(res.Metadata[MetaTensors], "projection") || strings.Contains(res.Metadata[MetaCodec], "projection") {
		t.Fatal("a container without projection must not mention it")
	}
	pres, _ := projectedContainer(t)
	if pres.Parts.Bases != 2*32*8*4+2*32*4 {
		t.Fatalf("bases part %d bytes, want the raw F32 basis and mean", pres.Parts.Bases)
	}
}

// FuzzProjectedDecompress mutates a container with a projected entry: any
// input must decode or be refused, never panic, and a decoded projected
// tensor must come back finite (the basis bounds guarantee it).
func FuzzProjectedDecompress(f *testing.F) {
	f.Add(encodeFile(f, projectedFile(f)))
	f.Fuzz(func(t *testing.T, data []byte) {
		file, err := safetensors.Parse(data)
		if err != nil {
			return
		}
		restored, err := DecompressWithin(file, 2, fuzzBudget)
		if errors.Is(err, ErrInternal) {
			t.Fatalf("internal error: %v", err)
		}
		if err != nil {
			return
		}
		for i := range restored.Tensors {
			tt := &restored.Tensors[i]
			if !tt.DType.IsFloat() {
				continue
			}
			v := make([]float32, tt.NumElements())
			if err := safetensors.DecodeFloat32(tt.DType, tt.Data, v); err != nil {
				t.Fatal(err)
			}
			for _, x := range v {
				if math.IsNaN(float64(x)) || math.IsInf(float64(x), 0) {
					t.Fatalf("tensor %q restored a non-finite value", tt.Name)
				}
			}
		}
	})
}

func TestBasisFits(t *testing.T) {
	tests := []struct {
		heads, dim, rank int64
		want             bool
	}{
		{3, 64, 32, true},
		{1, 1 << 13, 1 << 13, true},
		{1, 1 << 40, 1 << 30, false}, // would wrap int64 if multiplied directly
		{1 << 58, 64, 64, false},
		{2, 1 << 13, 1 << 13, false},
	}
	for _, tc := range tests {
		if got := basisFits(tc.heads, tc.dim, tc.rank); got != tc.want {
			t.Errorf("basisFits(%d, %d, %d) = %v, want %v", tc.heads, tc.dim, tc.rank, got, tc.want)
		}
	}
}
