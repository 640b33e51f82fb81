package compression

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"time"

	"github.com/kv-cache-p2p/validation/pkg/atomicfile"
	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// CompressFile compresses the safetensors file in into a container at out
// (written atomically; out may not be in). With out empty nothing is written:
// the report then describes the container that would have been written.
//
// The input is read tensor by tensor (mapped, or with positioned reads where
// it cannot be mapped); each tensor's payloads go to an unlinked scratch file
// beside out as soon as they are encoded, and the container is assembled
// from it once its header is known. Memory holds the tensors in flight, not
// the file. Only regular files are read and replaced (see package atomicfile
// for the output's mode and for symbolic links).
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
	src, err := openSource(in)
	if err != nil {
		return nil, err
	}
	defer src.close()
	if IsContainer(src.f) {
		return nil, fmt.Errorf("%s: %w", in, ErrAlreadyContainer)
	}
	var dst *atomicfile.File
	var sp *spill
	if out != "" {
		if dst, err = atomicfile.Create(out, atomicfile.Options{NoSync: cfg.NoSync, Perm: src.mode}); err != nil {
			return nil, err
		}
		defer dst.Abort()
		if sp, err = newSpill(out, len(src.f.Tensors)); err != nil {
			return nil, fmt.Errorf("%s: %w", out, err)
		}
		defer sp.close()
	}
	// The payloads stream to the scratch file: only the workers' buffers
	// count against the memory budget, not the file.
	workers, err := compressBudget(src.f, cfg, false)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", in, err)
	}
	if cfg.contextLength, err = checkSelectionInput(src.f); err != nil {
		return nil, fmt.Errorf("%s: %w", in, err)
	}
	if err := checkPresetSelection(src.f, cfg.Selection, cfg.Preset); err != nil {
		return nil, fmt.Errorf("%s: %w", in, err)
	}
	t0 := time.Now()
	cts, err := compressAll(src, cfg, workers, func(i int, ct *compressedTensor) error {
		if sp == nil { // metrics: only the sizes are needed
			for k := range ct.payload {
				ct.payload[k].Data = nil
			}
			return nil
		}
		if err := sp.put(i, ct); err != nil {
			return fmt.Errorf("%s: scratch: %w", out, err)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", in, err)
	}
	res, err := assemble(cts, cfg, src.f.Metadata)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", in, err)
	}
	codec := time.Since(t0)
	// The report is built, and checked to encode, before the output is put
	// in place: a command that fails leaves no container behind.
	r := NewReport(res, src.size, codec, time.Since(start))
	r.Input, r.Output = in, out
	if _, err := json.Marshal(&r); err != nil {
		return nil, fmt.Errorf("%s: %w: report: %v", in, ErrInternal, err)
	}
	if dst != nil {
		if err := sp.writeContainer(dst, res, cts); err != nil {
			return nil, fmt.Errorf("%s: %w", out, err)
		}
		if err := dst.Commit(); err != nil {
			return nil, fmt.Errorf("%s: %w", out, err)
		}
		r.setTotal(time.Since(start))
	}
	return &r, nil
}

// DecompressFile restores the container in to a safetensors file at out.
// Only cfg.Workers, cfg.MaxMemory and cfg.NoSync apply: the codec is the
// container's. A container whose decoding would not fit in the memory budget
// even with one worker is refused with ErrTooLarge before anything is
// allocated.
//
// The output's header follows from the index alone, so it is written first;
// each tensor is then decoded into its worker's reusable buffer and written
// at its offset. Memory holds workers × the largest tensor, not the file.
func DecompressFile(in, out string, cfg Config) (*DecompressReport, error) {
	start := time.Now()
	if err := atomicfile.CheckDistinct(in, out); err != nil {
		return nil, err
	}
	src, err := openSource(in)
	if err != nil {
		return nil, err
	}
	defer src.close()
	idx, err := ReadIndex(src.f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", in, err)
	}
	layout := make([]safetensors.Tensor, len(idx.Entries))
	for i, e := range idx.Entries {
		layout[i] = safetensors.Tensor{Name: e.Name, DType: safetensors.DType(e.DType), Shape: e.Shape}
	}
	hdr, dataLen, err := safetensors.LayoutHeader(layout, idx.SourceMetadata)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", in, err)
	}
	dst, err := atomicfile.Create(out, atomicfile.Options{NoSync: cfg.NoSync, Perm: src.mode})
	if err != nil {
		return nil, err
	}
	defer dst.Abort()
	head := make([]byte, 8, 8+len(hdr))
	binary.LittleEndian.PutUint64(head, uint64(len(hdr)))
	if _, err := dst.WriteAt(append(head, hdr...), 0); err != nil {
		return nil, fmt.Errorf("%s: %w", out, err)
	}
	offsets := make([]int64, len(layout))
	at := int64(len(head) + len(hdr))
	for i := range layout {
		offsets[i] = at
		at += layout[i].ByteLen()
	}
	workers, err := streamWorkers(idx, cfg.maxMemory(), cfg.workers())
	if err != nil {
		return nil, fmt.Errorf("%s: %w", in, err)
	}
	bufs := make([][]byte, workers)
	t0 := time.Now()
	err = decompressAll(src, idx, workers,
		func(w, i int, n int64) []byte { bufs[w] = grow(bufs[w], int(n)); return bufs[w] },
		func(w, i int, data []byte) error {
			if _, err := dst.WriteAt(data, offsets[i]); err != nil {
				return fmt.Errorf("%s: %w", out, err)
			}
			// The disk writes while the next tensors decode; the fsync of
			// Commit then waits for what is left (see benchmarks.md).
			dst.StartWriteback(offsets[i], int64(len(data)))
			return nil
		})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", in, err)
	}
	codec := time.Since(t0)
	restored := 8 + int64(len(hdr)) + dataLen
	r := &DecompressReport{
		SchemaVersion: SchemaVersion, Command: "decompress", Input: in, Output: out,
		OriginalSizeBytes: restored, CompressedSizeBytes: src.size,
		ProcessingTimeMS: ms(time.Since(start)), Codec: idx.Codec,
		Timings: map[string]float64{"codec": ms(codec), "total": ms(time.Since(start))},
	}
	if src.size > 0 {
		r.CompressionRatio = float64(restored) / float64(src.size)
	}
	if codec > 0 {
		r.ThroughputMBps = float64(restored) / 1e6 / codec.Seconds()
	}
	for i := range layout {
		r.Tensors = append(r.Tensors, infoOf(&layout[i]))
	}
	if err := dst.Commit(); err != nil {
		return nil, fmt.Errorf("%s: %w", out, err)
	}
	r.ProcessingTimeMS = ms(time.Since(start))
	r.Timings["total"] = r.ProcessingTimeMS
	return r, nil
}

// InspectOptions says how far inspect checks a container.
type InspectOptions struct {
	// Verify decodes every payload and tensor, as decompress would, into
	// per-worker buffers, without writing anything. Payload checksums are
	// always checked.
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
	src, err := openSource(in)
	if err != nil {
		return nil, err
	}
	defer src.close()
	f, size := src.f, src.size
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
	var buf []byte
	err = guardFaults(func() error {
		for i := range idx.Entries {
			e := &idx.Entries[i]
			for _, p := range e.payloads() {
				if p == nil {
					continue
				}
				stored, err := payloadBytes(src, p, &buf)
				if err == nil {
					err = verifyPayload(p, stored)
				}
				if err != nil {
					return fmt.Errorf("tensor %q: %w", e.Name, err)
				}
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", in, err)
	}
	budget := opt.MaxMemory
	if budget <= 0 {
		budget = DefaultMaxMemory()
	}
	if _, err := streamWorkers(idx, budget, 1); err != nil {
		return nil, fmt.Errorf("%s: %w", in, err) // decompress would refuse it: say so now
	}
	if opt.Verify {
		workers, err := streamWorkers(idx, budget, capWorkers(opt.Workers))
		if err != nil {
			return nil, fmt.Errorf("%s: %w", in, err)
		}
		bufs := make([][]byte, workers)
		err = decompressAll(src, idx, workers,
			func(w, i int, n int64) []byte { bufs[w] = grow(bufs[w], int(n)); return bufs[w] },
			func(w, i int, data []byte) error { return nil })
		if err != nil {
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
		for _, p := range e.payloads() {
			if p != nil {
				t, _ := f.Lookup(p.Tensor)
				ti.StoredBytes += t.ByteLen()
			}
		}
		r.Tensors = append(r.Tensors, ti)
	}
	return r, nil
}

// streamWorkers fits a streaming decode of idx (each worker decoding one
// tensor at a time into its own buffer, nothing else held) into budget
// bytes, and says how many of the wanted workers fit.
func streamWorkers(idx *Index, budget int64, want int) (int, error) {
	var largest int64
	for i := range idx.Entries {
		e := &idx.Entries[i]
		n, _ := safetensors.NumElements(e.Shape)
		size, _ := safetensors.ByteSize(n, safetensors.DType(e.DType))
		largest = max(largest, size)
	}
	fixed := satMul(int64(len(idx.Entries)), perTensorOverhead)
	workers, err := budgetWorkers(budget, fixed, satAdd(idx.maxScratch(), largest), want)
	return max(1, min(workers, len(idx.Entries))), err
}
