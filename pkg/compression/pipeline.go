package compression

import (
	"encoding/binary"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// TensorReport describes how one tensor was encoded and how well it was reconstructed.
type TensorReport struct {
	Name            string  `json:"name"`
	Shape           []int64 `json:"shape"`
	DType           string  `json:"dtype"`
	Mode            string  `json:"mode"`
	Elements        int64   `json:"elements"`
	OriginalBytes   int64   `json:"original_bytes"`
	CompressedBytes int64   `json:"compressed_bytes"`
	Quality
}

// Result is a compressed container held in memory.
type Result struct {
	// Tensors are the container's payload tensors, in file order.
	Tensors []safetensors.Tensor
	// Metadata is the container's __metadata__ map (format, codec, index).
	Metadata map[string]string
	// Codec is the parameters the container was written with.
	Codec Codec
	// Quality aggregates the error over every quantized element.
	Quality Quality
	// PerTensor has one report per original tensor, in the input's order.
	PerTensor []TensorReport
	// QuantizedElements counts the elements of int4 tensors, and
	// QuantizedPayloadBytes their codes and scales as stored.
	QuantizedElements, QuantizedPayloadBytes int64
	// FileSize is the exact size in bytes of the container once written.
	FileSize int64
	// Parts splits FileSize by content; Stages counts payloads by entropy stage.
	Parts  PartBytes
	Stages Stages
	// Selection is the configuration's preset selection (nil for none);
	// InputSelected says whether the input carried positions tensors.
	Selection     *PresetSelection
	InputSelected bool
}

// workerScratch is the per-goroutine working memory of Compress.
type workerScratch struct {
	in         []byte // the tensor's bytes when the input is not in memory
	x, mags    []float32
	codes      []byte
	scales     []uint16
	scaleBytes []byte
	pe         payloadEncoder
	general    generalScratch
	proj       projScratch
}

func grow[T any](s []T, n int) []T {
	if cap(s) < n {
		return make([]T, n)
	}
	return s[:n]
}

type compressedTensor struct {
	entry   Entry
	payload []safetensors.Tensor
	stats   tensorStats
	report  TensorReport
}

// Compress encodes every tensor of src: floating-point tensors (F16, BF16,
// F32, F64) with per-group INT4, all others losslessly. Errors name the tensor.
func Compress(src *safetensors.File, cfg Config) (*Result, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	workers, err := compressBudget(src, cfg, true)
	if err != nil {
		return nil, err
	}
	if cfg.contextLength, err = checkSelectionInput(src); err != nil {
		return nil, err
	}
	if err := checkPresetSelection(src, cfg.Selection, cfg.Preset); err != nil {
		return nil, err
	}
	out, err := compressAll(memorySource(src), cfg, workers, nil)
	if err != nil {
		return nil, err
	}
	return assemble(out, cfg, src.Metadata)
}

// compressAll encodes every tensor of src on up to workers goroutines, each
// with its own reusable scratch memory. emit, when set, receives each result
// on its worker's goroutine, in no particular order, and must consume the
// payload bytes before it returns: with emit set they live in the worker's
// reusable arena, which the worker's next tensor overwrites (a file writer
// stores them and sets Data to nil, so memory holds only the tensors in
// flight and nothing is allocated per tensor).
func compressAll(src *source, cfg Config, workers int, emit func(i int, ct *compressedTensor) error) ([]compressedTensor, error) {
	out := make([]compressedTensor, len(src.f.Tensors))
	// No more scratch than there are tensors: --workers 100000 must not
	// allocate 100000 encoders.
	scratch := make([]workerScratch, max(1, min(workers, len(src.f.Tensors))))
	for i := range scratch {
		scratch[i].pe.policy = cfg.entropy()
		scratch[i].pe.reuse = emit != nil
	}
	err := parallel(len(src.f.Tensors), len(scratch), func(w, i int) error {
		return guardFaults(func() error {
			scratch[w].pe.reset() // emit consumed the previous tensor's payloads
			t := src.f.Tensors[i] // a copy: Data may be pointed at the worker's buffer
			data, err := src.data(&t, &scratch[w].in)
			if err != nil {
				return err
			}
			t.Data = data
			ct, err := compressTensor(&t, cfg, &scratch[w])
			if err != nil {
				return fmt.Errorf("tensor %q: %w", t.Name, err)
			}
			if emit != nil {
				if err := emit(i, &ct); err != nil {
					return err
				}
				for k := range ct.payload { // the arena's bytes: not to be kept
					ct.payload[k].Data = nil
				}
			}
			out[i] = ct
			return nil
		})
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// assemble builds the container's index and layout from the encoded
// tensors. The payload tensors keep whatever Data emit left them.
func assemble(out []compressedTensor, cfg Config, source map[string]string) (*Result, error) {
	res := &Result{Codec: newCodec(cfg), Selection: cfg.Selection, InputSelected: cfg.contextLength > 0}
	var total tensorStats
	entries := make([]Entry, 0, len(out))
	for i := range out {
		ct := &out[i]
		entries = append(entries, ct.entry)
		res.Tensors = append(res.Tensors, ct.payload...)
		res.PerTensor = append(res.PerTensor, ct.report)
		if ct.entry.Mode != ModeStored && ct.entry.Mode != ModePositions {
			total.merge(ct.stats)
			res.QuantizedElements += ct.report.Elements
			res.QuantizedPayloadBytes += ct.report.CompressedBytes
		}
	}
	res.Quality = total.quality()
	var err error
	if res.Metadata, err = encodeIndex(res.Codec, entries, source); err != nil {
		return nil, err
	}
	hdr, dataLen, err := safetensors.LayoutHeader(res.Tensors, res.Metadata)
	if err != nil {
		return nil, err
	}
	res.FileSize = 8 + int64(len(hdr)) + dataLen
	res.Parts, res.Stages = partsOf(entries, res.Tensors, res.FileSize)
	return res, nil
}

func compressTensor(t *safetensors.Tensor, cfg Config, ws *workerScratch) (compressedTensor, error) {
	n := t.NumElements()
	ct := compressedTensor{
		entry:  Entry{Name: t.Name, DType: string(t.DType), Shape: t.Shape},
		report: TensorReport{Name: t.Name, Shape: t.Shape, DType: string(t.DType), Elements: n, OriginalBytes: int64(len(t.Data))},
	}
	if IsPositions(t.Name) {
		return compressPositions(t, cfg.contextLength, ws, ct)
	}
	if !t.DType.IsFloat() || n == 0 {
		data, enc := ws.pe.encode(t.Data)
		p := Payload{Tensor: t.Name + SuffixRaw, Encoding: enc, RawBytes: int64(len(t.Data)), CRC32C: checksum(data)}
		ct.entry.Mode, ct.entry.Raw = ModeStored, &p
		ct.payload = []safetensors.Tensor{{Name: p.Tensor, DType: safetensors.U8, Shape: []int64{int64(len(data))}, Data: data}}
		ct.report.Mode, ct.report.CompressedBytes = ModeStored, int64(len(data))
		ct.report.Quality = tensorStats{}.quality()
		return ct, nil
	}
	plan, err := planFor(t.Name, t.Shape, cfg)
	if b := cfg.Projection.lookup(t.Name); b != nil {
		return compressProjected(t, plan, cfg, ws, ct, b) // checks the plan against the coefficients' shape
	}
	if err != nil {
		return ct, err
	}
	if !plan.fast() {
		return compressGeneral(t, plan, cfg, ws, ct)
	}
	g := plan.Group
	ct.entry.GroupSize = ownGroup(plan, cfg)
	var sparse []float32
	if cfg.Sparsity > 0 {
		ws.x = grow(ws.x, int(n))
		if err := safetensors.DecodeFloat32(t.DType, t.Data, ws.x); err != nil {
			return ct, err
		}
		for _, v := range ws.x { // the threshold search must not see NaN: refuse it first
			if v != v || v-v != 0 {
				return ct, ErrNonFinite
			}
		}
		ws.mags = grow(ws.mags, int(n))
		sparsify(ws.x, cfg.Sparsity, ws.mags)
		sparse = ws.x
	}
	ws.codes = grow(ws.codes, int(n/2))
	ws.scaleBytes = grow(ws.scaleBytes, int(2*n/int64(g)))
	var st tensorStats
	job := rowJob{src: t.Data, dt: t.DType, dim: int(t.Shape[len(t.Shape)-1]), group: g, codes: ws.codes, scales: ws.scaleBytes}
	if sparse != nil || !encodeRows(job, &st) {
		ws.scales = grow(ws.scales, int(n/int64(g)))
		if st, err = quantizeTensor(t.Data, t.DType, sparse, g, ws.codes, ws.scales); err != nil {
			return ct, err
		}
		scalesToBytes(ws.scaleBytes, ws.scales)
	}
	codes, cenc := ws.pe.encode(ws.codes)
	scales, senc := ws.pe.encode(ws.scaleBytes)
	cp := Payload{Tensor: t.Name + SuffixCodes, Encoding: cenc, RawBytes: int64(len(ws.codes)), CRC32C: checksum(codes)}
	sp := Payload{Tensor: t.Name + SuffixScales, Encoding: senc, RawBytes: int64(len(ws.scaleBytes)), CRC32C: checksum(scales)}
	ct.entry.Mode, ct.entry.Codes, ct.entry.Scales = ModeInt4, &cp, &sp
	ct.payload = []safetensors.Tensor{u8Tensor(cp.Tensor, codes), u8Tensor(sp.Tensor, scales)}
	ct.stats = st
	ct.report.Mode = ModeInt4
	ct.report.CompressedBytes = int64(len(codes) + len(scales))
	ct.report.Quality = st.quality()
	return ct, nil
}

func u8Tensor(name string, data []byte) safetensors.Tensor {
	return safetensors.Tensor{Name: name, DType: safetensors.U8, Shape: []int64{int64(len(data))}, Data: data}
}

// compressGeneral encodes a tensor whose plan is not the tuned version-1 scheme.
func compressGeneral(t *safetensors.Tensor, plan tensorPlan, cfg Config, ws *workerScratch, ct compressedTensor) (compressedTensor, error) {
	enc, err := encodeGeneral(t, plan, cfg.Sparsity, &ws.general)
	if err != nil {
		return ct, err
	}
	e := ct.addQuantized(t.Name, plan, cfg, ws, enc.codes, enc.scales, enc.mins, enc.sink)
	ct.stats = enc.stats
	ct.report.Mode = e.Mode
	ct.report.Quality = enc.stats.quality()
	return ct, nil
}

// addPayload encodes raw with the worker's payload encoder, appends it as the
// U8 tensor name+suffix and returns its index entry.
func (ct *compressedTensor) addPayload(ws *workerScratch, name, suffix string, raw []byte) *Payload {
	data, encoding := ws.pe.encode(raw)
	p := &Payload{Tensor: name + suffix, Encoding: encoding, RawBytes: int64(len(raw)), CRC32C: checksum(data)}
	ct.payload = append(ct.payload, u8Tensor(p.Tensor, data))
	ct.report.CompressedBytes += int64(len(data))
	return p
}

// addQuantized fills the entry fields a general-path tensor takes from its plan
// and adds its code, scale, minimum (when any) and sink (when non-nil) payloads,
// in that order; it returns the entry for the caller to finish.
func (ct *compressedTensor) addQuantized(name string, plan tensorPlan, cfg Config, ws *workerScratch, codes, scales, mins, sink []byte) *Entry {
	e := &ct.entry
	e.Mode, e.Scheme, e.Axis, e.Rotate, e.Sink = modeName(plan.Bits), plan.Scheme, plan.Axis, plan.Rotate, plan.Sink
	e.GroupSize = ownGroup(plan, cfg)
	e.Codes = ct.addPayload(ws, name, SuffixCodes, codes)
	e.Scales = ct.addPayload(ws, name, SuffixScales, scales)
	if len(mins) > 0 { // no groups (every position in the sink): no minimums, as the index rules say
		e.Mins = ct.addPayload(ws, name, SuffixMins, mins)
	}
	if sink != nil {
		e.SinkP = ct.addPayload(ws, name, SuffixSink, sink)
	}
	return e
}

// Restored is a decompressed container: the original tensors and metadata.
type Restored struct {
	Tensors  []safetensors.Tensor
	Metadata map[string]string
	Index    *Index
}

// Decompress validates container f (index, checksums, sizes) and rebuilds the
// original tensors with their names, shapes and dtypes, within the default
// memory budget.
func Decompress(f *safetensors.File, workers int) (*Restored, error) {
	return DecompressWithin(f, workers, 0)
}

// DecompressWithin is Decompress with a memory budget of maxMemory bytes (0:
// DefaultMaxMemory()). A container whose restored tensors and working buffers
// would not fit is refused with ErrTooLarge before anything is allocated;
// fewer workers run when that is what fits.
func DecompressWithin(f *safetensors.File, workers int, maxMemory int64) (*Restored, error) {
	idx, err := ReadIndex(f)
	if err != nil {
		return nil, err
	}
	workers = capWorkers(workers)
	if maxMemory <= 0 {
		maxMemory = DefaultMaxMemory()
	}
	if workers, err = budgetWorkers(maxMemory, idx.outputBytes(), idx.maxScratch(), workers); err != nil {
		return nil, err
	}
	out := make([]safetensors.Tensor, len(idx.Entries))
	alloc := func(w, i int, n int64) []byte { return make([]byte, n) }
	err = decompressAll(memorySource(f), idx, workers, alloc, func(w, i int, data []byte) error {
		e := &idx.Entries[i]
		out[i] = safetensors.Tensor{Name: e.Name, DType: safetensors.DType(e.DType), Shape: e.Shape, Data: data}
		return nil
	})
	if err != nil {
		return nil, err
	}
	for i := range out { // a worker that stopped early must not leave a hole
		e := &idx.Entries[i]
		n, _ := safetensors.NumElements(e.Shape)
		if want, _ := safetensors.ByteSize(n, safetensors.DType(e.DType)); out[i].Name != e.Name || int64(len(out[i].Data)) != want {
			return nil, fmt.Errorf("tensor %q: %w: restored %d bytes, want %d", e.Name, ErrInternal, len(out[i].Data), want)
		}
	}
	return &Restored{Tensors: out, Metadata: idx.SourceMetadata, Index: idx}, nil
}

// decompressScratch is the per-goroutine working memory of decompressAll.
type decompressScratch struct {
	in                []byte    // a payload's stored bytes when the input is not in memory
	parts             [4][]byte // expanded payloads of the general path
	codes, scaleBytes []byte
	scales            []uint16
	general           generalScratch
	proj              projScratch
}

// decompressAll rebuilds every entry of idx from src on up to workers
// goroutines. Entry i is decoded into dst(w, i, n), n being its size in
// bytes, and handed to done on the same goroutine w; a file writer passes a
// reusable buffer per worker and writes it out in done.
func decompressAll(src *source, idx *Index, workers int, dst func(w, i int, n int64) []byte, done func(w, i int, data []byte) error) error {
	g := idx.Codec.GroupSize
	if workers <= 0 {
		workers = (Config{}).workers()
	}
	workers = max(1, min(workers, len(idx.Entries)))
	ws := make([]decompressScratch, workers)
	return parallel(len(idx.Entries), workers, func(w, i int) error {
		return guardFaults(func() error {
			e := &idx.Entries[i]
			s := &ws[w]
			dt := safetensors.DType(e.DType)
			n, _ := safetensors.NumElements(e.Shape)
			data := dst(w, i, n*int64(dt.Bits())/8)
			if err := decodeEntry(src, e, g, dt, data, s); err != nil {
				return fmt.Errorf("tensor %q: %w", e.Name, err)
			}
			return done(w, i, data)
		})
	})
}

// decodeEntry rebuilds one tensor into data, which has exactly its size.
func decodeEntry(src *source, e *Entry, g int, dt safetensors.DType, data []byte, s *decompressScratch) error {
	if e.Mode == ModeStored {
		return readPayload(src, e.Raw, data, &s.in)
	}
	if e.Mode == ModePositions {
		return decodePositions(src, e, data, s)
	}
	plan := e.plan(g)
	if e.Projection != nil {
		return decodeProjected(src, e, plan, dt, data, s)
	}
	if !plan.fast() {
		for k, p := range []*Payload{e.Codes, e.Scales, e.Mins, e.SinkP} {
			if p == nil {
				s.parts[k] = nil
				continue
			}
			s.parts[k] = grow(s.parts[k][:0], int(p.RawBytes))
			if err := readPayload(src, p, s.parts[k], &s.in); err != nil {
				return err
			}
		}
		return decodeGeneral(e, plan, s.parts[0], s.parts[1], s.parts[2], s.parts[3], data, &s.general)
	}
	s.codes = grow(s.codes, int(e.Codes.RawBytes))
	s.scaleBytes = grow(s.scaleBytes, int(e.Scales.RawBytes))
	if err := readPayload(src, e.Codes, s.codes, &s.in); err != nil {
		return err
	}
	if err := readPayload(src, e.Scales, s.scaleBytes, &s.in); err != nil {
		return err
	}
	s.scales = grow(s.scales, len(s.scaleBytes)/2)
	for j := range s.scales {
		s.scales[j] = binary.LittleEndian.Uint16(s.scaleBytes[2*j:])
		if s.scales[j]&0x7c00 == 0x7c00 || s.scales[j]&0x8000 != 0 {
			return fmt.Errorf("%w: scale %d is negative or not finite", ErrCorrupt, j)
		}
	}
	dequantizeTensor(s.codes, s.scales, plan.Group, dt, data)
	return nil
}

// readPayload checks payload p's checksum and expands it into dst. buf holds
// the stored bytes when the input is not in memory.
func readPayload(src *source, p *Payload, dst []byte, buf *[]byte) error {
	stored, err := payloadBytes(src, p, buf)
	if err != nil {
		return err
	}
	if err := verifyPayload(p, stored); err != nil {
		return err
	}
	return decodePayload(stored, p.Encoding, dst)
}

// payloadBytes returns p's stored bytes: those ReadIndex located when the
// container is in memory or mapped, otherwise read from the file into *buf.
func payloadBytes(src *source, p *Payload, buf *[]byte) ([]byte, error) {
	if p.data != nil || src.off == nil {
		return p.data, nil
	}
	t, _ := src.f.Lookup(p.Tensor) // presence checked by ReadIndex
	return src.data(t, buf)
}

// verifyPayload checks a payload's stored bytes against its CRC-32C.
func verifyPayload(p *Payload, stored []byte) error {
	if got := checksum(stored); got != p.CRC32C {
		return fmt.Errorf("%w: payload %q has crc32c %s, index says %s", ErrChecksum, p.Tensor, got, p.CRC32C)
	}
	return nil
}

// parallel runs fn(worker, i) for i in [0, n) on up to workers goroutines and
// returns the error of the lowest failing i, so the reported error does not
// depend on scheduling. A panic in fn is recovered and returned as an error
// wrapping ErrInternal: the caller never goes on with a tensor left undone.
func parallel(n, workers int, fn func(worker, i int) error) error {
	inner := fn
	fn = func(w, i int) (err error) {
		defer func() {
			if r := recover(); r != nil {
				err = fmt.Errorf("%w: %v", ErrInternal, r)
			}
		}()
		return inner(w, i)
	}
	workers = max(1, min(workers, n))
	errs := make([]error, n)
	var next atomic.Int64
	var failed atomic.Bool
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !failed.Load() {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				if errs[i] = fn(w, i); errs[i] != nil {
					failed.Store(true)
				}
			}
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}
