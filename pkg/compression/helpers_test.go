package compression

import (
	"bytes"
	"errors"
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

// assertDecodeMatchesScalar decodes the same streams of a [.., seq, dim] tensor of dt
// (with a deterministic sink of p.Sink rows) once with the vector kernels, when the
// CPU has them, and once with the scalar ones, and fails unless both give the same
// error or the same bytes.
func assertDecodeMatchesScalar(t *testing.T, e *Entry, p tensorPlan, codes, scales, mins []byte, seq, dim int, dt safetensors.DType) {
	t.Helper()
	sink := make([]byte, p.Sink*dim*dt.Bits()/8)
	for i := range sink {
		sink[i] = byte(i * 7)
	}
	n := seq * dim * dt.Bits() / 8
	vecOut, scalarOut := make([]byte, n), make([]byte, n)
	defer func(old bool) { simdEnabled = old }(simdEnabled)
	simdEnabled = haveSIMD
	vecErr := decodeGeneral(e, p, codes, scales, mins, sink, vecOut, &generalScratch{})
	simdEnabled = false
	scalarErr := decodeGeneral(e, p, codes, scales, mins, sink, scalarOut, &generalScratch{})
	if (vecErr == nil) != (scalarErr == nil) || (vecErr != nil && vecErr.Error() != scalarErr.Error()) {
		t.Fatalf("errors differ: vector %v, scalar %v", vecErr, scalarErr)
	}
	if vecErr == nil && !bytes.Equal(vecOut, scalarOut) {
		t.Fatalf("restored bytes differ from the scalar decoder's")
	}
}

// decompressFuzzInput parses data as a container and decodes it on two workers
// within fuzzBudget. It returns nil when either step refuses the input, and fails
// the test on ErrInternal, which no input may cause.
func decompressFuzzInput(t *testing.T, data []byte) *Restored {
	t.Helper()
	file, err := safetensors.Parse(data)
	if err != nil {
		return nil
	}
	restored, err := DecompressWithin(file, 2, fuzzBudget)
	if errors.Is(err, ErrInternal) {
		t.Fatalf("internal error: %v", err)
	}
	if err != nil {
		return nil
	}
	return restored
}
