package compression

import (
	"encoding/json"
	"math"
	"strconv"
)

// Quality thresholds. They are scale-free: the signal-to-noise ratio compares
// the error's power with the signal's, so the same reconstruction gets the same
// verdict whatever the magnitude of the cache's values. An SNR of s dB is an
// RMSE of 10^(-s/20) times the signal's RMS (18 dB: 12.6 %, 30 dB: 3.2 %,
// 40 dB: 1 %). The seed compared the absolute RMSE with 0.10, which no real
// cache of large activations could meet.
const (
	MinSNRdB       = 18.0 // passed and ACCEPTABLE: RMSE under 12.6 % of the signal's RMS
	GoodSNRdB      = 30.0 // GOOD: RMSE under 3.2 % of the signal's RMS
	ExcellentSNRdB = 40.0 // EXCELLENT: RMSE under 1 % of the signal's RMS
	MinCosine      = 0.99
	snrCapDB       = 200.0 // reported when the reconstruction is exact
	SchemaVersion  = 1
)

// Quality levels, from best to worst.
const (
	QualityExcellent  = "EXCELLENT"
	QualityGood       = "GOOD"
	QualityAcceptable = "ACCEPTABLE"
	QualityPoor       = "POOR"
)

// Metric is one error measure. It encodes to JSON as a number, or as null
// when it is NaN or infinite, so a report is always valid JSON.
type Metric float64

// MarshalJSON writes m as encoding/json writes a float64, or null when m is not finite.
func (m Metric) MarshalJSON() ([]byte, error) {
	if math.IsNaN(float64(m)) || math.IsInf(float64(m), 0) {
		return []byte("null"), nil
	}
	return json.Marshal(float64(m))
}

// Quality holds the error measures of a reconstruction against its original.
type Quality struct {
	RMSE             Metric `json:"rmse"`
	SNRdB            Metric `json:"snr_db"`
	CosineSimilarity Metric `json:"cosine_similarity"`
	MaxError         Metric `json:"max_error"`
}

func (s tensorStats) quality() Quality {
	q := Quality{CosineSimilarity: 1, SNRdB: snrCapDB, MaxError: Metric(s.maxErr)}
	if s.n == 0 {
		return q
	}
	q.RMSE = Metric(math.Sqrt(s.sumEE / float64(s.n)))
	if s.sumEE > 0 {
		q.SNRdB = Metric(math.Max(-snrCapDB, math.Min(snrCapDB, 10*math.Log10(s.sumXX/s.sumEE))))
	}
	switch {
	case s.sumXX > 0 && s.sumYY > 0:
		q.CosineSimilarity = Metric(s.sumXY / (math.Sqrt(s.sumXX) * math.Sqrt(s.sumYY)))
	case s.sumXX == 0 && s.sumYY == 0:
		q.CosineSimilarity = 1
	default:
		q.CosineSimilarity = 0
	}
	return q
}

// RelativeRMSE is the RMSE as a fraction of the original's RMS,
// 10^(-SNR/20): 0.1 means the error is a tenth of the signal's typical size.
func (q Quality) RelativeRMSE() float64 { return math.Pow(10, -float64(q.SNRdB)/20) }

// Level classifies q on scale-free measures: EXCELLENT (SNR > 40 dB),
// GOOD (> 30 dB), ACCEPTABLE (> 18 dB and cosine > 0.99), otherwise POOR.
// A NaN SNR or cosine is POOR.
func (q Quality) Level() string {
	switch {
	case !(q.SNRdB > MinSNRdB && q.CosineSimilarity > MinCosine):
		return QualityPoor
	case q.SNRdB > ExcellentSNRdB:
		return QualityExcellent
	case q.SNRdB > GoodSNRdB:
		return QualityGood
	default:
		return QualityAcceptable
	}
}

// Violations lists each threshold q fails, in words; empty when q passes
// (SNR > 18 dB and cosine > 0.99, the same rule as ACCEPTABLE or better).
func (q Quality) Violations() []string {
	v := []string{}
	if !(q.SNRdB > MinSNRdB) {
		v = append(v, "snr_db "+fmtFloat(float64(q.SNRdB))+" <= "+fmtFloat(MinSNRdB)+
			" (rmse is "+strconv.FormatFloat(100*q.RelativeRMSE(), 'f', 1, 64)+"% of the signal's rms, limit 12.6%)")
	}
	if !(q.CosineSimilarity > MinCosine) {
		v = append(v, "cosine_similarity "+fmtFloat(float64(q.CosineSimilarity))+" <= "+fmtFloat(MinCosine))
	}
	return v
}

func fmtFloat(v float64) string { return strconv.FormatFloat(v, 'g', 6, 64) }
