package compression

import (
	"encoding/json"
	"fmt"
	"os"
	"time"

	"github.com/kv-cache-p2p/validation/pkg/atomicfile"
	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// CompressFile compresses the safetensors file in into a container at out
// (written atomically; out may not be in). With out empty nothing is written:
// the report then describes the container that would have been written.
func CompressFile(in, out string, cfg Config) (*Report, error) {
	start := time.Now()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if out != "" {
		if err := atomicfile.CheckDistinct(in, out); err != nil {
			return nil, err
		}
	}
	src, size, err := readFile(in)
	if err != nil {
		return nil, err
	}
	if IsContainer(src) {
		return nil, fmt.Errorf("%s: %w", in, ErrAlreadyContainer)
	}
	t0 := time.Now()
	res, err := Compress(src, cfg)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", in, err)
	}
	codec := time.Since(t0)
	// The report is built, and checked to encode, before the output is
	// written: a command that fails leaves no container behind.
	r := NewReport(res, size, codec, time.Since(start))
	r.Input, r.Output = in, out
	if _, err := json.Marshal(&r); err != nil {
		return nil, fmt.Errorf("%s: %w: report: %v", in, ErrInternal, err)
	}
	if out != "" {
		if err := safetensors.WriteFile(out, res.Tensors, res.Metadata); err != nil {
			return nil, fmt.Errorf("%s: %w", out, err)
		}
		total := time.Since(start)
		r.ProcessingTimeMS, r.Timings["total"] = ms(total), ms(total)
	}
	return &r, nil
}

// DecompressFile restores the container in to a safetensors file at out,
// within a memory budget of maxMemory bytes (0: DefaultMaxMemory()).
func DecompressFile(in, out string, workers int, maxMemory int64) (*DecompressReport, error) {
	start := time.Now()
	if err := atomicfile.CheckDistinct(in, out); err != nil {
		return nil, err
	}
	src, size, err := readFile(in)
	if err != nil {
		return nil, err
	}
	t0 := time.Now()
	res, err := DecompressWithin(src, workers, maxMemory)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", in, err)
	}
	codec := time.Since(t0)
	hdr, dataLen, err := safetensors.EncodeHeader(res.Tensors, res.Metadata)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", in, err)
	}
	restored := 8 + int64(len(hdr)) + dataLen
	r := &DecompressReport{
		SchemaVersion: SchemaVersion, Command: "decompress", Input: in, Output: out,
		OriginalSizeBytes: restored, CompressedSizeBytes: size,
		ProcessingTimeMS: ms(time.Since(start)), Codec: res.Index.Codec,
		Timings: map[string]float64{"codec": ms(codec), "total": ms(time.Since(start))},
	}
	if size > 0 {
		r.CompressionRatio = float64(restored) / float64(size)
	}
	if codec > 0 {
		r.ThroughputMBps = float64(restored) / 1e6 / codec.Seconds()
	}
	for i := range res.Tensors {
		r.Tensors = append(r.Tensors, infoOf(&res.Tensors[i]))
	}
	if err := safetensors.WriteFile(out, res.Tensors, res.Metadata); err != nil {
		return nil, fmt.Errorf("%s: %w", out, err)
	}
	r.ProcessingTimeMS = ms(time.Since(start))
	r.Timings["total"] = r.ProcessingTimeMS
	return r, nil
}

// InspectOptions says how far inspect checks a container.
type InspectOptions struct {
	// Verify decodes every payload and tensor in memory, as decompress
	// would, without writing anything. Payload checksums are always checked.
	Verify bool
	// Workers and MaxMemory bound the decoding of Verify, as for decompress.
	Workers   int
	MaxMemory int64
}

// Inspect describes a safetensors file or a container after validating it:
// a file's header and layout, a container's index, the CRC-32C of every
// payload and that it fits the memory budget as decompress would need it,
// and with opt.Verify the decoding of every tensor.
func Inspect(in string, opt InspectOptions) (*InspectReport, error) {
	f, size, err := readFile(in)
	if err != nil {
		return nil, err
	}
	r := &InspectReport{SchemaVersion: SchemaVersion, Command: "inspect", Input: in, Kind: "safetensors",
		FileSizeBytes: size, HeaderBytes: f.HeaderSize, Metadata: f.Metadata, Tensors: []TensorInfo{}}
	if r.Metadata == nil {
		r.Metadata = map[string]string{}
	}
	if !IsContainer(f) {
		for i := range f.Tensors {
			r.Tensors = append(r.Tensors, infoOf(&f.Tensors[i]))
		}
		return r, nil
	}
	idx, err := ReadIndex(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", in, err)
	}
	for i := range idx.Entries {
		e := &idx.Entries[i]
		for _, p := range []*Payload{e.Codes, e.Scales, e.Mins, e.SinkP, e.Raw} {
			if p == nil {
				continue
			}
			if err := verifyPayload(p); err != nil {
				return nil, fmt.Errorf("%s: tensor %q: %w", in, e.Name, err)
			}
		}
	}
	budget := opt.MaxMemory
	if budget <= 0 {
		budget = DefaultMaxMemory()
	}
	if _, err := budgetWorkers(budget, idx.outputBytes(), idx.maxScratch(), 1); err != nil {
		return nil, fmt.Errorf("%s: %w", in, err) // decompress would refuse it: say so now
	}
	if opt.Verify {
		if _, err := DecompressWithin(f, opt.Workers, budget); err != nil {
			return nil, fmt.Errorf("%s: %w", in, err)
		}
	}
	r.Kind, r.Codec, r.FormatVersion = FormatName, &idx.Codec, idx.Version
	r.Metadata = idx.SourceMetadata
	if r.Metadata == nil {
		r.Metadata = map[string]string{}
	}
	for _, e := range idx.Entries {
		dt := safetensors.DType(e.DType)
		n, _ := safetensors.NumElements(e.Shape)
		ti := TensorInfo{Name: e.Name, DType: e.DType, Shape: e.Shape, Bytes: n * int64(dt.Bits()) / 8, Mode: e.Mode}
		for _, p := range []*Payload{e.Codes, e.Scales, e.Mins, e.SinkP, e.Raw} {
			if p != nil {
				ti.StoredBytes += int64(len(p.data))
			}
		}
		r.Tensors = append(r.Tensors, ti)
	}
	return r, nil
}

func readFile(path string) (*safetensors.File, int64, error) {
	buf, err := os.ReadFile(path)
	if err != nil {
		return nil, 0, err
	}
	f, err := safetensors.Parse(buf)
	if err != nil {
		return nil, 0, fmt.Errorf("%s: %w", path, err)
	}
	return f, int64(len(buf)), nil
}
