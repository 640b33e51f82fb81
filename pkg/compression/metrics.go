package compression

import (
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

// Quality holds the error measures of a reconstruction against its original.
type Quality struct {
	RMSE             float64 `json:"rmse"`
	SNRdB            float64 `json:"snr_db"`
	CosineSimilarity float64 `json:"cosine_similarity"`
	MaxError         float64 `json:"max_error"`
}

func (s tensorStats) quality() Quality {
	q := Quality{CosineSimilarity: 1, SNRdB: snrCapDB, MaxError: s.maxErr}
	if s.n == 0 {
		return q
	}
	q.RMSE = math.Sqrt(s.sumEE / float64(s.n))
	if s.sumEE > 0 {
		q.SNRdB = math.Max(-snrCapDB, math.Min(snrCapDB, 10*math.Log10(s.sumXX/s.sumEE)))
	}
	switch {
	case s.sumXX > 0 && s.sumYY > 0:
		q.CosineSimilarity = s.sumXY / (math.Sqrt(s.sumXX) * math.Sqrt(s.sumYY))
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
		v = append(v, "rmse "+fmtFloat(q.RMSE)+" >= "+fmtFloat(MaxRMSE))
	}
	if !(q.SNRdB > MinSNRdB) {
		v = append(v, "snr_db "+fmtFloat(q.SNRdB)+" <= "+fmtFloat(MinSNRdB))
	}
	if !(q.CosineSimilarity > MinCosine) {
		v = append(v, "cosine_similarity "+fmtFloat(q.CosineSimilarity)+" <= "+fmtFloat(MinCosine))
	}
	return v
}

func fmtFloat(v float64) string { return strconv.FormatFloat(v, 'g', 6, 64) }
