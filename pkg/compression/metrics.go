package compression

import (
	"encoding/json"
	"math"
	"strconv"
)

// Quality thresholds: a reconstruction passes when all three hold.
const (
	MaxRMSE       = 0.10
	MinSNRdB      = 18.0
	MinCosine     = 0.99
	snrCapDB      = 200.0 // reported when the reconstruction is exact
	SchemaVersion = 1
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

// Level classifies q: EXCELLENT (RMSE < 0.01, SNR > 40 dB), GOOD (< 0.05,
// > 30 dB), ACCEPTABLE (< 0.10, > 18 dB), otherwise POOR.
func (q Quality) Level() string {
	switch {
	case q.RMSE < 0.01 && q.SNRdB > 40:
		return QualityExcellent
	case q.RMSE < 0.05 && q.SNRdB > 30:
		return QualityGood
	case q.RMSE < MaxRMSE && q.SNRdB > MinSNRdB:
		return QualityAcceptable
	default:
		return QualityPoor
	}
}

// Violations lists each threshold q fails, in words; empty when q passes.
func (q Quality) Violations() []string {
	v := []string{}
	if !(q.RMSE < MaxRMSE) {
		v = append(v, "rmse "+fmtFloat(float64(q.RMSE))+" >= "+fmtFloat(MaxRMSE))
	}
	if !(q.SNRdB > MinSNRdB) {
		v = append(v, "snr_db "+fmtFloat(float64(q.SNRdB))+" <= "+fmtFloat(MinSNRdB))
	}
	if !(q.CosineSimilarity > MinCosine) {
		v = append(v, "cosine_similarity "+fmtFloat(float64(q.CosineSimilarity))+" <= "+fmtFloat(MinCosine))
	}
	return v
}

func fmtFloat(v float64) string { return strconv.FormatFloat(v, 'g', 6, 64) }
