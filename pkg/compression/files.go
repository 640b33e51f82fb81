package compression

import (
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
	if out != "" {
		if err := safetensors.WriteFile(out, res.Tensors, res.Metadata); err != nil {
			return nil, fmt.Errorf("%s: %w", out, err)
		}
	}
	r := NewReport(res, size, codec, time.Since(start))
	r.Input, r.Output = in, out
	return &r, nil
}

// DecompressFile restores the container in to a safetensors file at out.
func DecompressFile(in, out string, workers int) (*DecompressReport, error) {
	start := time.Now()
	if err := atomicfile.CheckDistinct(in, out); err != nil {
		return nil, err
	}
	src, size, err := readFile(in)
	if err != nil {
		return nil, err
	}
	t0 := time.Now()
	res, err := Decompress(src, workers)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", in, err)
	}
	codec := time.Since(t0)
	hdr, dataLen, err := safetensors.EncodeHeader(res.Tensors, res.Metadata)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", in, err)
	}
	if err := safetensors.WriteFile(out, res.Tensors, res.Metadata); err != nil {
		return nil, fmt.Errorf("%s: %w", out, err)
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
	return r, nil
}

// Inspect describes a safetensors file or a container, validating either fully.
func Inspect(in string) (*InspectReport, error) {
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
	r.Kind, r.Codec, r.FormatVersion = FormatName, &idx.Codec, idx.Version
	r.Metadata = idx.SourceMetadata
	if r.Metadata == nil {
		r.Metadata = map[string]string{}
	}
	for _, e := range idx.Entries {
		dt := safetensors.DType(e.DType)
		n, _ := safetensors.NumElements(e.Shape)
		ti := TensorInfo{Name: e.Name, DType: e.DType, Shape: e.Shape, Bytes: n * int64(dt.Bits()) / 8, Mode: e.Mode}
		for _, p := range []*Payload{e.Codes, e.Scales, e.Raw} {
			if p != nil {
				t, _ := f.Lookup(p.Tensor)
				ti.StoredBytes += int64(len(t.Data))
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
