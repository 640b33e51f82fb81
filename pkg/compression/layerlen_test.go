package compression

import (
	"math/rand/v2"
	"testing"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// slidingCache builds a cache shaped like Gemma 3's: one KV head, head_dim 256,
// layers of different lengths (sliding-window layers hold fewer tokens than
// the full-attention ones).
func slidingCache(tb testing.TB, lengths []int, dt safetensors.DType, seed uint64) *safetensors.File {
	tb.Helper()
	const dim = 256
	rng := rand.New(rand.NewPCG(seed, 7))
	f := &safetensors.File{Metadata: map[string]string{"model_name": "sliding"}}
	for l, seq := range lengths {
		for _, kind := range []string{"key", "value"} {
			vals := make([]float32, seq*dim)
			for i := range vals {
				v := rng.NormFloat64()
				if kind == "key" && i%dim < 2 {
					v *= 8
				}
				vals[i] = float32(v)
			}
			data := make([]byte, len(vals)*dt.Bits()/8)
			if err := safetensors.EncodeFloat32(dt, vals, data); err != nil {
				tb.Fatal(err)
			}
			f.Tensors = append(f.Tensors, safetensors.Tensor{
				Name: layerName(l, kind), DType: dt, Shape: []int64{1, 1, int64(seq), dim}, Data: data,
			})
		}
	}
	return f
}

// TestPerLayerLengthsRoundTrip checks that every preset and group size keeps
// each layer's own shape when layers differ in length (sink positions
// included: a layer shorter than a preset's sink is stored exactly).
func TestPerLayerLengthsRoundTrip(t *testing.T) {
	lengths := []int{15, 15, 15, 15, 15, 40, 15, 3}
	for _, name := range PresetNames() {
		p, err := LoadPreset(name)
		if err != nil {
			t.Fatal(err)
		}
		for _, g := range GroupSizes {
			cfg, _ := p.ApplyFlags(Config{GroupSize: g}, func(n string) bool { return n == "group-size" })
			t.Run(name+"/G"+itoa(g), func(t *testing.T) {
				src := slidingCache(t, lengths, safetensors.F16, uint64(g))
				res, restored, _ := roundTrip(t, src, cfg)
				if len(restored.Tensors) != len(src.Tensors) {
					t.Fatalf("%d tensors restored, want %d", len(restored.Tensors), len(src.Tensors))
				}
				for i := range src.Tensors {
					a, b := &src.Tensors[i], &restored.Tensors[i]
					if a.Name != b.Name || len(a.Shape) != len(b.Shape) || len(a.Data) != len(b.Data) {
						t.Fatalf("tensor %d: %s %v, want %s %v", i, b.Name, b.Shape, a.Name, a.Shape)
					}
					for j := range a.Shape {
						if a.Shape[j] != b.Shape[j] {
							t.Fatalf("%s: shape %v, want %v", a.Name, b.Shape, a.Shape)
						}
					}
				}
				if res.Quality.CosineSimilarity < 0.9 {
					t.Errorf("cosine similarity %.4f too low: %+v", res.Quality.CosineSimilarity, res.Quality)
				}
			})
		}
	}
}
