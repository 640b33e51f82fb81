package compression

import (
	"bytes"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// kvCache builds a synthetic KV cache: layers × (key, value) tensors of shape
// [1, heads, seq, dim] in dtype dt, Gaussian values with a few outlier channels
// in the keys, as real caches have.
func kvCache(tb testing.TB, layers, heads, seq, dim int, dt safetensors.DType, seed uint64) *safetensors.File {
	tb.Helper()
	rng := rand.New(rand.NewPCG(seed, 99))
	f := &safetensors.File{Metadata: map[string]string{"model_name": "synthetic"}}
	n := heads * seq * dim
	vals := make([]float32, n)
	for l := range layers {
		for _, kind := range []string{"key", "value"} {
			for i := range vals {
				v := rng.NormFloat64()
				if kind == "key" && i%dim < 2 {
					v *= 8
				}
				vals[i] = float32(v)
			}
			data := make([]byte, n*dt.Bits()/8)
			if err := safetensors.EncodeFloat32(dt, vals, data); err != nil {
				tb.Fatal(err)
			}
			f.Tensors = append(f.Tensors, safetensors.Tensor{
				Name: layerName(l, kind), DType: dt, Shape: []int64{1, int64(heads), int64(seq), int64(dim)}, Data: data,
			})
		}
	}
	return f
}

func layerName(l int, kind string) string {
	return "layer_" + itoa(l) + "_" + kind
}

func itoa(i int) string {
	if i == 0 {
		return "0"
	}
	s := ""
	for ; i > 0; i /= 10 {
		s = string(rune('0'+i%10)) + s
	}
	return s
}

func decode(tb testing.TB, t *safetensors.Tensor) []float32 {
	tb.Helper()
	out := make([]float32, t.NumElements())
	if err := safetensors.DecodeFloat32(t.DType, t.Data, out); err != nil {
		tb.Fatal(err)
	}
	return out
}

func f16(v float64) float32 { return safetensors.F16ToF32(safetensors.F32ToF16(float32(v))) }

func near[T ~float64](a, b T) bool {
	return math.Abs(float64(a-b)) <= 1e-5*math.Max(1, math.Abs(float64(b)))
}

func f32Bytes(x []float32) []byte {
	b := make([]byte, 4*len(x))
	safetensors.EncodeFloat32(safetensors.F32, x, b)
	return b
}

func f16Bytes(x []float32) []byte {
	b := make([]byte, 2*len(x))
	safetensors.EncodeFloat32(safetensors.F16, x, b)
	return b
}

// asContainer writes res as a container file in memory and parses it back,
// as Decompress would receive it from disk.
func asContainer(tb testing.TB, res *Result) *safetensors.File {
	tb.Helper()
	var buf bytes.Buffer
	if err := safetensors.Encode(&buf, res.Tensors, res.Metadata); err != nil {
		tb.Fatal(err)
	}
	container, err := safetensors.Parse(buf.Bytes())
	if err != nil {
		tb.Fatal(err)
	}
	return container
}
