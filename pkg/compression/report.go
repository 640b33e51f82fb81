package compression

import (
	"time"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// Report is the JSON document that kv-compress prints for compress and
// metrics. Its fields are a stable contract with the Python bridge; see
// docs/cli.md. Sizes are whole files in bytes.
type Report struct {
	SchemaVersion       int     `json:"schema_version"`
	Command             string  `json:"command"`
	Input               string  `json:"input"`
	Output              string  `json:"output,omitempty"`
	CompressionRatio    float64 `json:"compression_ratio"`
	OriginalSizeBytes   int64   `json:"original_size_bytes"`
	CompressedSizeBytes int64   `json:"compressed_size_bytes"`
	Quality
	QualityLevel     string   `json:"quality_level"`
	ProcessingTimeMS float64  `json:"processing_time_ms"`
	Passed           bool     `json:"passed"`
	Violations       []string `json:"violations"`
	// BitsPerElement counts every stored bit of the quantized tensors (codes
	// and scales after LZ4) per element; RatioVsFP16 is 16 / BitsPerElement.
	BitsPerElement float64 `json:"bits_per_element"`
	RatioVsFP16    float64 `json:"ratio_vs_fp16"`
	// FP16SizeBytes is what the input file would weigh with every floating
	// tensor in float16; DiskRatioVsFP16 divides it by the container's size:
	// the on-disk ratio against a float16 cache, whatever the input's dtype.
	FP16SizeBytes    int64              `json:"fp16_size_bytes"`
	DiskRatioVsFP16  float64            `json:"disk_ratio_vs_fp16"`
	ThroughputMBps   float64            `json:"throughput_mb_per_s"`
	Codec            Codec              `json:"codec"`
	QuantizedTensors int                `json:"quantized_tensors"`
	StoredTensors    int                `json:"stored_tensors"`
	Timings          map[string]float64 `json:"timings_ms"`
	// BytesByPart splits the container's size by content (codes, scales,
	// minimums, sink, lossless tensors, header), as stored; BitsByPart is the
	// same per quantized element; Stages counts payloads by entropy stage.
	BytesByPart PartBytes          `json:"bytes_by_part"`
	BitsByPart  map[string]float64 `json:"bits_per_element_by_part"`
	Stages      Stages             `json:"entropy_stages"`
	// Preset names the preset that ran; PresetModifiedBy lists the codec
	// flags given explicitly on top of it (empty when it ran as defined).
	Preset           string   `json:"preset,omitempty"`
	PresetModifiedBy []string `json:"preset_modified_by"`
	// PresetSelection is the preset's "selection" object, as the file gives
	// it; InputSelected, present with it, says whether the input carried
	// positions tensors (a token-selected cache). Both are omitted when the
	// preset has no selection.
	PresetSelection *PresetSelection `json:"preset_selection,omitempty"`
	InputSelected   *bool            `json:"input_selected,omitempty"`
	Tensors         []TensorReport   `json:"tensors"`
}

// NewReport summarises a compression of a file of originalSize bytes.
// codec is the time spent encoding; total the whole command's wall time.
func NewReport(res *Result, originalSize int64, codec, total time.Duration) Report {
	r := Report{
		SchemaVersion:       SchemaVersion,
		OriginalSizeBytes:   originalSize,
		CompressedSizeBytes: res.FileSize,
		Quality:             res.Quality,
		QualityLevel:        res.Quality.Level(),
		ProcessingTimeMS:    ms(total),
		Violations:          res.Quality.Violations(),
		Codec:               res.Codec,
		Tensors:             res.PerTensor,
		Timings:             map[string]float64{"codec": ms(codec), "total": ms(total)},
		BytesByPart:         res.Parts,
		Preset:              res.Codec.Preset,
		PresetModifiedBy:    []string{},
		Stages:              res.Stages,
	}
	r.Passed = len(r.Violations) == 0
	if res.Selection != nil {
		selected := res.InputSelected
		r.PresetSelection, r.InputSelected = res.Selection, &selected
	}
	if res.FileSize > 0 {
		r.CompressionRatio = float64(originalSize) / float64(res.FileSize)
	}
	if res.QuantizedElements > 0 {
		r.BitsPerElement = 8 * float64(res.QuantizedPayloadBytes) / float64(res.QuantizedElements)
		r.RatioVsFP16 = 16 / r.BitsPerElement
		r.BitsByPart = res.Parts.bitsPer(res.QuantizedElements)
	}
	if codec > 0 {
		r.ThroughputMBps = float64(originalSize) / 1e6 / codec.Seconds()
	}
	r.FP16SizeBytes = originalSize
	for _, t := range res.PerTensor {
		if safetensors.DType(t.DType).IsFloat() {
			r.FP16SizeBytes += 2*t.Elements - t.OriginalBytes
		}
		if t.Mode == ModePositions { // indices, not cache: not part of the float16 cache
			r.FP16SizeBytes -= t.OriginalBytes
			r.StoredTensors++
			continue
		}
		if t.Mode != ModeStored {
			r.QuantizedTensors++
		} else {
			r.StoredTensors++
		}
	}
	if res.FileSize > 0 {
		r.DiskRatioVsFP16 = float64(r.FP16SizeBytes) / float64(res.FileSize)
	}
	return r
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// DecompressReport is the JSON document printed by decompress.
type DecompressReport struct {
	SchemaVersion       int                `json:"schema_version"`
	Command             string             `json:"command"`
	Input               string             `json:"input"`
	Output              string             `json:"output"`
	CompressionRatio    float64            `json:"compression_ratio"`
	OriginalSizeBytes   int64              `json:"original_size_bytes"`
	CompressedSizeBytes int64              `json:"compressed_size_bytes"`
	ProcessingTimeMS    float64            `json:"processing_time_ms"`
	ThroughputMBps      float64            `json:"throughput_mb_per_s"`
	Codec               Codec              `json:"codec"`
	Timings             map[string]float64 `json:"timings_ms"`
	Tensors             []TensorInfo       `json:"tensors"`
}

// TensorInfo names one tensor of a file, as listed by inspect and decompress.
type TensorInfo struct {
	Name  string  `json:"name"`
	DType string  `json:"dtype"`
	Shape []int64 `json:"shape"`
	Bytes int64   `json:"bytes"`
	Mode  string  `json:"mode,omitempty"`
	// StoredBytes is the size of the tensor's payloads in a container.
	StoredBytes int64 `json:"stored_bytes,omitempty"`
}

// InspectReport is the JSON document printed by inspect.
type InspectReport struct {
	SchemaVersion int               `json:"schema_version"`
	Command       string            `json:"command"`
	Input         string            `json:"input"`
	Kind          string            `json:"kind"` // "safetensors" or "kv-compress"
	FileSizeBytes int64             `json:"file_size_bytes"`
	HeaderBytes   int64             `json:"header_bytes"`
	Metadata      map[string]string `json:"metadata"`
	Codec         *Codec            `json:"codec,omitempty"`
	FormatVersion int               `json:"format_version,omitempty"`
	Tensors       []TensorInfo      `json:"tensors"`
}

func infoOf(t *safetensors.Tensor) TensorInfo {
	return TensorInfo{Name: t.Name, DType: string(t.DType), Shape: t.Shape, Bytes: t.ByteLen()}
}

// setTotal records the command's wall time once the output is in place.
func (r *Report) setTotal(d time.Duration) {
	r.ProcessingTimeMS = ms(d)
	r.Timings["total"] = ms(d)
}
