package compression

import (
	"bytes"
	"math"
	"testing"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// TestRotatedMetrics compares the error measured in the rotated basis (the
// default for rotated tensors) with the error measured in the original basis
// after the inverse rotation and the rounding to the stored dtype
// (Config.ExactMetrics), as docs/cli.md states it: the same payloads; RMSE
// and SNR apart by no more than the dtype rounding can explain; the largest
// error over rotated coefficients below the element-wise one; and identical
// figures where the original basis is used anyway (8 bits in float16 or
// bfloat16, sparsity).
func TestRotatedMetrics(t *testing.T) {
	sigBits := map[safetensors.DType]float64{safetensors.F16: 11, safetensors.BF16: 8, safetensors.F32: 24}
	for _, cfg := range []Config{
		DefaultConfig(),
		{GroupSize: 64, Rotate: RotateHadamard},
		{GroupSize: 32, Scheme: SchemeAsym, Rotate: RotateHadamard, KeyAxis: KeyAxisChannel, Sink: 1},
		{GroupSize: 64, Bits: 3, Rotate: RotateHadamard},
		{GroupSize: 128, Bits: 2, Scheme: SchemeAsym, Rotate: RotateHadamard, Sink: 2},
		{GroupSize: 64, Bits: 8, Rotate: RotateHadamard},
		{GroupSize: 64, Rotate: RotateHadamard, Sparsity: 0.2},
	} {
		for _, dt := range []safetensors.DType{safetensors.F16, safetensors.BF16, safetensors.F32} {
			t.Run(codecName(cfg)+"-sp"+itoa(int(100*cfg.Sparsity))+"/"+string(dt), func(t *testing.T) {
				src := kvCache(t, 2, 3, 37, 128, dt, 11)
				fast, exact := compressFastAndExact(t, src, cfg)
				for i := range fast.Tensors {
					if !bytes.Equal(fast.Tensors[i].Data, exact.Tensors[i].Data) {
						t.Fatalf("payload %s depends on the metrics' basis", fast.Tensors[i].Name)
					}
				}
				inOriginal := cfg.Sparsity > 0 || (cfg.bits() == 8 && dt != safetensors.F32)
				for i, r := range fast.PerTensor {
					e := exact.PerTensor[i]
					if inOriginal {
						if r.Quality != e.Quality {
							t.Errorf("%s: %+v, want the original basis's %+v", r.Name, r.Quality, e.Quality)
						}
						continue
					}
					// The dtype rounding the rotated basis leaves out, r, has
					// Σr² ≤ s·Σ(x−y)² with s = 2^-2p·Σy²/Σ(x−y)² for p
					// significant bits, so by Cauchy–Schwarz the error energy
					// moves by at most (2√s + s)·Σ(x−y)², and the RMSE by at
					// most √s + s relative (float32 rounding: 1e-5).
					// float64(): the fields may be a named float type.
					rmse, eRMSE := float64(r.RMSE), float64(e.RMSE)
					snr, eSNR := float64(r.SNRdB), float64(e.SNRdB)
					cos, eCos := float64(r.CosineSimilarity), float64(e.CosineSimilarity)
					maxErr, eMaxErr := float64(r.MaxError), float64(e.MaxError)
					s := math.Pow(2, -2*sigBits[dt]) * math.Pow(10, eSNR/10)
					bound := math.Sqrt(s) + s + 1e-5
					if d := math.Abs(rmse-eRMSE) / eRMSE; d > bound {
						t.Errorf("%s: RMSE %g, original basis %g: relative difference %.3g > %.3g", r.Name, rmse, eRMSE, d, bound)
					}
					if d := math.Abs(snr - eSNR); d > 10*math.Log10(1+2*bound) {
						t.Errorf("%s: SNR %g dB, original basis %g dB", r.Name, snr, eSNR)
					}
					if d := math.Abs(cos - eCos); d > 2*bound*(1-eCos)+1e-6 {
						t.Errorf("%s: cosine %g, original basis %g", r.Name, cos, eCos)
					}
					if !(maxErr > 0 && maxErr <= eMaxErr) {
						t.Errorf("%s: max error %g over rotated coefficients, %g element-wise", r.Name, maxErr, eMaxErr)
					}
				}
			})
		}
	}
}

// TestRotatedMetricsNearTheDtypeLimit: a float16 tensor whose rotated values
// come near rotatedMetricsLimit (4,094 for blocks of 64) is measured in the
// original basis, where a reconstruction at the edge of float16's range
// shows; one well below it is measured in the rotated basis.
func TestRotatedMetricsNearTheDtypeLimit(t *testing.T) {
	for _, c := range []struct {
		name       string
		scale      float32
		inOriginal bool
	}{{"ordinary", 1, false}, {"large", 3000, true}} {
		t.Run(c.name, func(t *testing.T) {
			src := kvCache(t, 1, 2, 16, 64, safetensors.F32, 4)
			for i := range src.Tensors {
				x := decode(t, &src.Tensors[i])
				for j := range x {
					x[j] *= c.scale
				}
				src.Tensors[i] = safetensors.Tensor{Name: src.Tensors[i].Name, DType: safetensors.F16, Shape: src.Tensors[i].Shape, Data: f16Bytes(x)}
			}
			cfg := DefaultConfig()
			fast, exact := compressFastAndExact(t, src, cfg)
			// The largest error tells the bases apart; the sums may differ in
			// the last digits (the scalar and vector paths add in another order).
			same := fast.Quality.MaxError == exact.Quality.MaxError && near(float64(fast.Quality.RMSE), float64(exact.Quality.RMSE))
			if same != c.inOriginal {
				t.Errorf("rotated-basis report %+v, original basis %+v: want the original basis %v", fast.Quality, exact.Quality, c.inOriginal)
			}
		})
	}
}

// compressFastAndExact compresses src with cfg twice: with the rotated-basis
// metrics (the default) and with ExactMetrics, for tests that compare them.
func compressFastAndExact(t *testing.T, src *safetensors.File, cfg Config) (fast, exact *Result) {
	t.Helper()
	exactCfg := cfg
	exactCfg.ExactMetrics = true
	fast, err := Compress(src, cfg)
	if err != nil {
		t.Fatal(err)
	}
	exact, err = Compress(src, exactCfg)
	if err != nil {
		t.Fatal(err)
	}
	return fast, exact
}
