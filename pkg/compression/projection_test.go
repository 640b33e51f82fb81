package compression

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// orthoBasis returns heads random D×r matrices with orthonormal columns
// ([head][dim][rank], Gram–Schmidt in float64) and means, rounded to dt.
func orthoBasis(heads, dim, rank int, dt safetensors.DType, seed uint64) (basis, mean []float32) {
	rng := rand.New(rand.NewPCG(seed, 7))
	basis = make([]float32, heads*dim*rank)
	mean = make([]float32, heads*dim)
	for h := range heads {
		cols := make([][]float64, rank)
		for k := range cols {
			v := make([]float64, dim)
			for j := range v {
				v[j] = rng.NormFloat64()
			}
			for _, u := range cols[:k] {
				dot := 0.0
				for j := range v {
					dot += v[j] * u[j]
				}
				for j := range v {
					v[j] -= dot * u[j]
				}
			}
			norm := 0.0
			for _, x := range v {
				norm += x * x
			}
			for j := range v {
				v[j] /= math.Sqrt(norm)
			}
			cols[k] = v
			for j := range dim {
				basis[h*dim*rank+j*rank+k] = safetensors.RoundTo(dt, float32(v[j]))
			}
		}
		for j := range dim {
			mean[h*dim+j] = safetensors.RoundTo(dt, float32(0.1*rng.NormFloat64()))
		}
	}
	return basis, mean
}

// lowRankCache builds [1, heads, seq, dim] values that lie near the span of
// the first used columns of the basis (of rank columns; plus small noise),
// and keys of plain Gaussian noise.
func lowRankCache(heads, seq, dim, rank, used int, basis, mean []float32, seed uint64) *safetensors.File {
	rng := rand.New(rand.NewPCG(seed, 3))
	vals := make([]float32, heads*seq*dim)
	keys := make([]float32, heads*seq*dim)
	for h := range heads {
		for s := range seq {
			row := vals[(h*seq+s)*dim : (h*seq+s+1)*dim]
			for k := range used {
				c := rng.NormFloat64() * 2 / float64(k+1)
				for j := range dim {
					row[j] += float32(c) * basis[h*dim*rank+j*rank+k]
				}
			}
			for j := range row {
				row[j] += mean[h*dim+j] + float32(0.01*rng.NormFloat64())
				keys[(h*seq+s)*dim+j] = float32(rng.NormFloat64())
			}
		}
	}
	shape := []int64{1, int64(heads), int64(seq), int64(dim)}
	return &safetensors.File{Tensors: []safetensors.Tensor{
		{Name: "layer_0_key", DType: safetensors.F16, Shape: shape, Data: f16Bytes(keys)},
		{Name: "layer_0_value", DType: safetensors.F16, Shape: shape, Data: f16Bytes(vals)},
	}}
}

// basesFile is what writeProjectionPreset puts in a bases file: one tensor's basis.
type basesFile struct {
	name                string
	dt                  safetensors.DType
	basisShape          []int64
	meanShape           []int64
	basis, mean         []float32
	extraTensor, noMean bool
}

// writeProjectionPreset writes a bases file and a preset naming it into dir
// and returns the preset's path. mutate may change the preset's projection object.
func writeProjectionPreset(t *testing.T, dir string, bf basesFile, mutate func(map[string]any)) string {
	t.Helper()
	enc := func(x []float32) []byte {
		b := make([]byte, len(x)*bf.dt.Bits()/8)
		if err := safetensors.EncodeFloat32(bf.dt, x, b); err != nil {
			t.Fatal(err)
		}
		return b
	}
	tensors := []safetensors.Tensor{{Name: bf.name + ".basis", DType: bf.dt, Shape: bf.basisShape, Data: enc(bf.basis)}}
	if !bf.noMean {
		tensors = append(tensors, safetensors.Tensor{Name: bf.name + ".mean", DType: bf.dt, Shape: bf.meanShape, Data: enc(bf.mean)})
	}
	if bf.extraTensor {
		tensors = append(tensors, safetensors.Tensor{Name: "stray", DType: bf.dt, Shape: bf.meanShape, Data: enc(bf.mean)})
	}
	raw := encodeFile(t, &safetensors.File{Tensors: tensors})
	if err := os.WriteFile(filepath.Join(dir, "bases.safetensors"), raw, 0o644); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(raw)
	proj := map[string]any{"bases": "bases.safetensors", "sha256": hex.EncodeToString(sum[:]), "model": "synthetic",
		"head_dim": bf.basisShape[1], "n_layers": 1, "n_kv_heads": bf.basisShape[0], "rank": bf.basisShape[len(bf.basisShape)-1]}
	if mutate != nil {
		mutate(proj)
	}
	preset := map[string]any{"name": "lowrank-test", "values": map[string]any{"axis": "channel", "rotate": "none", "group_size": 64},
		"projection": proj}
	js, _ := json.Marshal(preset)
	path := filepath.Join(dir, "preset.json")
	if err := os.WriteFile(path, js, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestProjectionRoundTrip(t *testing.T) {
	const heads, seq, dim = 2, 70, 64
	tests := []struct {
		name   string
		dt     safetensors.DType
		rank   int
		bits   int
		sink   int
		axis   string
		maxRel float64
	}{
		{"f16 bases r16 4-bit channel", safetensors.F16, 16, 4, 1, "channel", 0.12},
		{"f32 bases r32 8-bit channel", safetensors.F32, 32, 8, 0, "channel", 0.03},
		{"f16 bases r32 4-bit token g32", safetensors.F16, 32, 4, 2, "token", 0.12},
		{"f32 full rank 8-bit", safetensors.F32, 64, 8, 1, "channel", 0.02},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			basis, mean := orthoBasis(heads, dim, tc.rank, tc.dt, 11)
			src := lowRankCache(heads, seq, dim, tc.rank, min(tc.rank, 8), basis, mean, 5)
			path := writeProjectionPreset(t, t.TempDir(), basesFile{name: "layer_0_value", dt: tc.dt,
				basisShape: []int64{heads, dim, int64(tc.rank)}, meanShape: []int64{heads, dim}, basis: basis, mean: mean}, nil)
			p, err := LoadPreset(path)
			if err != nil {
				t.Fatal(err)
			}
			cfg := p.Config
			cfg.ValueBits, cfg.Sink = tc.bits, tc.sink
			cfg.Roles.Values.Axis = tc.axis
			if tc.axis == "token" {
				cfg.Roles.Values.GroupSize = 32
			}
			res, restored, _ := roundTrip(t, src, cfg)
			e := entryNamed(t, res, "layer_0_value")
			if e.Projection == nil || e.Projection.Rank != tc.rank || e.Projection.Heads != heads || e.Sink != tc.sink {
				t.Fatalf("entry %+v: want a projection of rank %d over %d heads, sink %d", e, tc.rank, heads, tc.sink)
			}
			if res.Parts.Bases == 0 || res.Codec.Projection == nil || res.Codec.Projection.SHA256 == "" {
				t.Fatalf("bases bytes %d, codec projection %+v: both must say what was embedded", res.Parts.Bases, res.Codec.Projection)
			}
			orig, got := decode(t, &src.Tensors[1]), decode(t, &restored.Tensors[1])
			var ee, xx, mse float64
			for i := range orig {
				d := float64(orig[i] - got[i])
				ee += d * d
				xx += float64(orig[i]) * float64(orig[i])
			}
			if rel := math.Sqrt(ee / xx); rel > tc.maxRel {
				t.Fatalf("relative RMSE %.4f > %.4f", rel, tc.maxRel)
			}
			for i := range tc.sink * dim { // the sink positions of head 0 come back exact
				if orig[i] != got[i] {
					t.Fatalf("sink element %d: %v != %v", i, got[i], orig[i])
				}
			}
			// The report's error is the decoder's: same reconstruction.
			for _, tr := range res.PerTensor {
				if tr.Name == "layer_0_value" {
					mse = ee / float64(len(orig))
					if !near(float64(tr.RMSE*tr.RMSE), mse) {
						t.Fatalf("report RMSE² %.8g, decoded %.8g", tr.RMSE*tr.RMSE, mse)
					}
				}
			}
		})
	}
}

func entryNamed(t *testing.T, res *Result, name string) Entry {
	t.Helper()
	var entries []Entry
	if err := json.Unmarshal([]byte(res.Metadata[MetaTensors]), &entries); err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.Name == name {
			return e
		}
	}
	t.Fatalf("no entry %q", name)
	return Entry{}
}

// TestProjectionArithmetic checks project and reconstruct against float64 sums.
func TestProjectionArithmetic(t *testing.T) {
	for _, tc := range []struct{ dim, rank int }{{8, 3}, {64, 16}, {64, 64}} {
		t.Run(fmt.Sprintf("d%d_r%d", tc.dim, tc.rank), func(t *testing.T) {
			basis, mean := orthoBasis(1, tc.dim, tc.rank, safetensors.F32, 3)
			b, err := NewProjectionBasis(1, tc.dim, tc.rank, safetensors.F32, f32Bytes(basis), f32Bytes(mean))
			if err != nil {
				t.Fatal(err)
			}
			rng := rand.New(rand.NewPCG(1, 2))
			x := make([]float32, 3*tc.dim)
			for i := range x {
				x[i] = float32(rng.NormFloat64())
			}
			c := make([]float32, 3*tc.rank)
			b.project(0, x, c)
			y := make([]float32, len(x))
			b.reconstruct(0, c, y)
			for row := range 3 {
				for k := range tc.rank {
					want := 0.0
					for j := range tc.dim {
						want += float64(x[row*tc.dim+j]-mean[j]) * float64(basis[j*tc.rank+k])
					}
					if math.Abs(float64(c[row*tc.rank+k])-want) > 1e-5*float64(tc.dim) {
						t.Fatalf("coefficient %d,%d = %v, want %v", row, k, c[row*tc.rank+k], want)
					}
				}
			}
			if tc.rank == tc.dim { // a full orthonormal basis reconstructs x
				for i := range x {
					if math.Abs(float64(x[i]-y[i])) > 1e-4 {
						t.Fatalf("element %d: %v, want %v", i, y[i], x[i])
					}
				}
			}
		})
	}
}

func TestProjectionPresetRefused(t *testing.T) {
	const heads, dim, rank = 2, 64, 16
	basis, mean := orthoBasis(heads, dim, rank, safetensors.F32, 1)
	good := func() basesFile {
		return basesFile{name: "layer_0_value", dt: safetensors.F32, basisShape: []int64{heads, dim, rank}, meanShape: []int64{heads, dim},
			basis: append([]float32(nil), basis...), mean: append([]float32(nil), mean...)}
	}
	tests := []struct {
		name   string
		edit   func(*basesFile)
		mutate func(map[string]any)
		target error
		say    string
	}{
		{"nan in basis", func(b *basesFile) { b.basis[5] = float32(math.NaN()) }, nil, ErrProjection, "basis element 5"},
		{"basis element beyond 1", func(b *basesFile) { b.basis[0] = 3 }, nil, ErrProjection, "[-1, 1]"},
		{"inf in mean", func(b *basesFile) { b.mean[1] = float32(math.Inf(1)) }, nil, ErrProjection, "mean element 1"},
		{"rank beyond head_dim", func(b *basesFile) {
			b.basisShape = []int64{1, 4, 8}
			b.meanShape = []int64{1, 4}
			b.basis, b.mean = make([]float32, 32), make([]float32, 4)
		}, func(m map[string]any) { delete(m, "head_dim"); delete(m, "n_kv_heads") }, ErrProjection, "rank 8"},
		{"mean of the wrong shape", func(b *basesFile) { b.meanShape = []int64{heads, dim / 2}; b.mean = b.mean[:heads*dim/2] }, nil, ErrProjection, "want [heads, head_dim, rank]"},
		{"basis of rank 2", func(b *basesFile) { b.basisShape = []int64{heads * dim, rank} }, func(m map[string]any) { m["head_dim"] = dim }, ErrProjection, "want [heads, head_dim, rank]"},
		{"missing mean", func(b *basesFile) { b.noMean = true }, nil, ErrProjection, "needs both"},
		{"stray tensor", func(b *basesFile) { b.extraTensor = true }, nil, ErrProjection, `"stray"`},
		{"head_dim disagrees", nil, func(m map[string]any) { m["head_dim"] = 128 }, ErrProjection, "the preset says"},
		{"wrong sha256", nil, func(m map[string]any) { m["sha256"] = strings.Repeat("0", 64) }, ErrProjection, "SHA-256"},
		{"malformed sha256", nil, func(m map[string]any) { m["sha256"] = "abc" }, ErrPreset, "projection.sha256"},
		{"layers disagree", nil, func(m map[string]any) {
			m["layers"] = []map[string]int{{"layer": 0, "keys": 0, "values": 8}}
		}, ErrProjection, "projection.layers says 8"},
		{"unknown field", nil, func(m map[string]any) { m["basis_dtype"] = "F16" }, ErrPreset, "basis_dtype"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			bf := good()
			if tc.edit != nil {
				tc.edit(&bf)
			}
			path := writeProjectionPreset(t, t.TempDir(), bf, tc.mutate)
			_, err := LoadPreset(path)
			if !errors.Is(err, tc.target) || !strings.Contains(err.Error(), tc.say) || !strings.Contains(err.Error(), "preset.json") {
				t.Fatalf("got %v, want %v saying %q and naming the preset", err, tc.target, tc.say)
			}
		})
	}
}

// TestProjectionMismatchRefused: bases that do not fit the cache's tensors are an invalid input.
func TestProjectionMismatchRefused(t *testing.T) {
	basis, mean := orthoBasis(3, 64, 16, safetensors.F32, 1)
	path := writeProjectionPreset(t, t.TempDir(), basesFile{name: "layer_0_value", dt: safetensors.F32,
		basisShape: []int64{3, 64, 16}, meanShape: []int64{3, 64}, basis: basis, mean: mean}, nil)
	p, err := LoadPreset(path)
	if err != nil {
		t.Fatal(err)
	}
	src := kvCache(t, 1, 2, 40, 64, safetensors.F16, 1) // 2 heads, bases for 3
	if _, err := Compress(src, p.Config); !errors.Is(err, ErrProjection) || !strings.Contains(err.Error(), "layer_0_value") {
		t.Fatalf("got %v, want ErrProjection naming the tensor", err)
	}
}

// BenchmarkProjection compresses and decompresses a SmolLM2-shaped layer
// ([1, 3, 2048, 64] float16 keys and values) with the values projected to
// rank 32, beside the same cache through the default codec.
func BenchmarkProjection(b *testing.B) {
	const heads, seq, dim, rank = 3, 2048, 64, 32
	basis, mean := orthoBasis(heads, dim, rank, safetensors.F16, 1)
	pb, err := NewProjectionBasis(heads, dim, rank, safetensors.F16, f16Bytes(basis), f16Bytes(mean))
	if err != nil {
		b.Fatal(err)
	}
	src := lowRankCache(heads, seq, dim, rank, 16, basis, mean, 1)
	proj := DefaultConfig()
	proj.Roles = &RolePlans{Values: &RolePlan{Axis: KeyAxisChannel, Rotate: RotateNone}}
	proj.Projection = &ProjectionSet{Bases: map[string]*ProjectionBasis{"layer_0_value": pb}}
	for _, bc := range []struct {
		name string
		cfg  Config
	}{{"default", DefaultConfig()}, {"values-rank32", proj}} {
		bc.cfg.Workers = 1
		res, err := Compress(src, bc.cfg)
		if err != nil {
			b.Fatal(err)
		}
		container := asContainer(b, res)
		b.Run("compress/"+bc.name, func(b *testing.B) {
			b.SetBytes(int64(2 * heads * seq * dim * 2))
			for b.Loop() {
				if _, err := Compress(src, bc.cfg); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run("decompress/"+bc.name, func(b *testing.B) {
			b.SetBytes(int64(2 * heads * seq * dim * 2))
			for b.Loop() {
				if _, err := Decompress(container, 1); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
