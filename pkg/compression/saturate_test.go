package compression

import (
	"encoding/json"
	"math"
	"testing"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// TestReconstructionSaturates: a float16 cache holding ±65504 used to
// reconstruct to ±Inf (and compress failed after writing, with
// "json: unsupported value: +Inf"); a finite 3e38 in the sink of a float32
// file gave NaN metrics. Every codec must now restore finite values within the
// dtype's range, report finite metrics, and measure the error of what it stores.
func TestReconstructionSaturates(t *testing.T) {
	big := func(dt safetensors.DType, vals ...float32) *safetensors.File {
		f := kvCache(t, 1, 2, 8, 64, dt, 21)
		for i := range f.Tensors {
			x := decode(t, &f.Tensors[i])
			for j := range x {
				x[j] = vals[j%len(vals)] * float32(1+j%3) / 3
			}
			x[0], x[1] = vals[0], -vals[0]
			if err := safetensors.EncodeFloat32(dt, x, f.Tensors[i].Data); err != nil {
				t.Fatal(err)
			}
		}
		return f
	}
	inputs := []struct {
		name string
		file *safetensors.File
	}{
		{"F16 65504", big(safetensors.F16, 65504, 65504, -60000, 1)},
		{"F16 65504 everywhere", big(safetensors.F16, 65504)},
	}
	sink := kvCache(t, 1, 2, 8, 64, safetensors.F32, 22) // a finite 3e38 in the kept first position
	for i := range sink.Tensors {
		x := decode(t, &sink.Tensors[i])
		x[0], x[1] = 3e38, -3e38
		safetensors.EncodeFloat32(safetensors.F32, x, sink.Tensors[i].Data)
	}
	inputs = append(inputs, struct {
		name string
		file *safetensors.File
	}{"F32 3e38 in the sink", sink})
	configs := append([]Config{DefaultConfig(), SeedConfig()}, schemeConfigs()...)
	for _, in := range inputs {
		for _, cfg := range configs {
			t.Run(in.name+"/"+codecName(cfg), func(t *testing.T) {
				// Metrics are finite in either basis; the largest error is
				// compared with the restored file below, so that report is
				// measured in the original basis (rotated tensors default to
				// the rotated one, docs/cli.md).
				exact := cfg
				exact.ExactMetrics = true
				var res *Result
				for _, c := range []Config{cfg, exact} {
					r, err := Compress(in.file, c)
					if err != nil {
						return // refusing (a scale that overflows float16, a rotation out of range) is allowed
					}
					for _, q := range append([]Quality{r.Quality}, qualities(r)...) {
						for _, v := range []float64{float64(q.RMSE), float64(q.SNRdB), float64(q.CosineSimilarity), float64(q.MaxError)} {
							if math.IsNaN(v) || math.IsInf(v, 0) {
								t.Fatalf("non-finite metric in %+v (%+v)", q, c)
							}
						}
					}
					res = r
				}
				restored, err := Decompress(asContainer(t, res), 1)
				if err != nil {
					t.Fatal(err)
				}
				var maxErr float64
				for i := range restored.Tensors {
					dt := restored.Tensors[i].DType
					x, y := decode(t, &in.file.Tensors[i]), decode(t, &restored.Tensors[i])
					for j, v := range y {
						if math.IsNaN(float64(v)) || math.Abs(float64(v)) > float64(maxFinite(dt)) {
							t.Fatalf("tensor %d element %d restored as %v (max finite %v)", i, j, v, maxFinite(dt))
						}
						maxErr = math.Max(maxErr, math.Abs(float64(x[j]-v))) // float32 differences, as the encoder measures them
					}
				}
				if cfg.Sparsity == 0 && maxErr != float64(res.Quality.MaxError) {
					t.Errorf("report says max error %v, the restored file has %v", res.Quality.MaxError, maxErr)
				}
			})
		}
	}
}

func qualities(res *Result) []Quality {
	var qs []Quality
	for _, r := range res.PerTensor {
		qs = append(qs, r.Quality)
	}
	return qs
}

func TestSaturate(t *testing.T) {
	tests := []struct {
		dt      safetensors.DType
		in, out float32
	}{
		{safetensors.F16, 65519, 65504}, {safetensors.F16, 65520, 65504}, {safetensors.F16, -1e9, -65504},
		{safetensors.F16, 1, 1}, {safetensors.BF16, math.MaxFloat32, maxFiniteBF16}, {safetensors.F32, 3e38, 3e38},
	}
	for _, tc := range tests {
		got := safetensors.RoundTo(tc.dt, saturate(tc.dt, tc.in))
		if got != tc.out {
			t.Errorf("%s: %v saturates to %v, want %v", tc.dt, tc.in, got, tc.out)
		}
	}
}

// TestMetricJSON: a metric that is not finite encodes as null; a finite one
// exactly as encoding/json writes a float64.
func TestMetricJSON(t *testing.T) {
	q := Quality{RMSE: Metric(math.Inf(1)), SNRdB: Metric(math.NaN()), CosineSimilarity: 0.1 + 0.2, MaxError: 1e21}
	got, err := json.Marshal(q)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := json.Marshal(0.1 + 0.2)
	m, _ := json.Marshal(1e21)
	want := `{"rmse":null,"snr_db":null,"cosine_similarity":` + string(c) + `,"max_error":` + string(m) + `}`
	if string(got) != want {
		t.Fatalf("got %s, want %s", got, want)
	}
}
