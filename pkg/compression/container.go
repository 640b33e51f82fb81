package compression

import (
	"encoding/json"
	"fmt"
	"hash/crc32"
	"slices"
	"strconv"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// Metadata keys of a container's safetensors header.
const (
	MetaFormat         = "format"
	MetaFormatVersion  = "format_version"
	MetaCodec          = "codec"
	MetaTensors        = "tensors"
	MetaSourceMetadata = "source_metadata"
	MetaIndexChecksum  = "index_crc32c"
)

// Tensor modes.
const (
	ModeInt4   = "int4"   // floating-point tensor: packed 4-bit codes + float16 scales (int2, int3, int8 likewise)
	ModeStored = "stored" // any other tensor, kept losslessly
)

// Payload suffixes appended to an original tensor's name.
const (
	SuffixCodes  = ".codes"
	SuffixScales = ".scales"
	SuffixMins   = ".mins"
	SuffixSink   = ".sink"
	SuffixRaw    = ".raw"
)

// Codec records the parameters a container was written with. Each tensor's
// entry repeats the ones that apply to it, and decoding reads those.
type Codec struct {
	Scheme      string  `json:"scheme"`
	Bits        int     `json:"bits"`
	KeyBits     int     `json:"key_bits"`
	ValueBits   int     `json:"value_bits"`
	GroupSize   int     `json:"group_size"`
	Rotate      string  `json:"rotate"`
	KeyAxis     string  `json:"key_axis"`
	Sink        int     `json:"sink"`
	Sparsity    float64 `json:"sparsity"`
	ScaleDType  string  `json:"scale_dtype"`
	Rounding    string  `json:"rounding"`
	NibbleOrder string  `json:"nibble_order"`
	Checksum    string  `json:"checksum"`
	// Entropy is the entropy policy (version 2; absent in version 1, which is "lz4").
	Entropy string `json:"entropy,omitempty"`
	// Preset names the preset that chose these parameters (version 2, optional).
	Preset string `json:"preset,omitempty"`
	// Roles are the per-role, per-layer plans applied on top (version 2, optional).
	Roles *RolePlans `json:"roles,omitempty"`
	// Projection names the bases file the projected tensors came from
	// (optional, informational: each projected entry embeds its basis).
	Projection *ProjectionRef `json:"projection,omitempty"`
}

// DefaultCodec is the codec record of the default preset: what compress writes without flags.
func DefaultCodec() Codec {
	c := DefaultConfig()
	c.Preset = PresetDefault
	return newCodec(c)
}

func newCodec(c Config) Codec {
	return Codec{Scheme: c.scheme(), Bits: c.bits(), KeyBits: c.keyBits(), ValueBits: c.valueBits(),
		GroupSize: c.GroupSize, Rotate: c.rotate(), KeyAxis: c.keyAxis(), Sink: c.Sink,
		Sparsity: c.Sparsity, ScaleDType: "F16", Rounding: "half_to_even", NibbleOrder: "low_first", Checksum: "crc32c",
		Entropy: c.entropy(), Preset: c.Preset, Roles: c.Roles, Projection: c.Projection.ref()}
}

// Payload locates one stored payload and describes how to check and expand it.
type Payload struct {
	Tensor   string `json:"tensor"`
	Encoding string `json:"encoding"`
	RawBytes int64  `json:"raw_bytes"`
	CRC32C   string `json:"crc32c"`

	// data is the payload's bytes as stored, located by ReadIndex.
	data []byte
}

// Entry describes one original tensor of a container. Quantized entries
// (mode "int2", "int3", "int4" or "int8") say how they were encoded; an
// omitted field takes its version-1 default (sym, last axis, no rotation, no sink).
type Entry struct {
	Name   string  `json:"name"`
	DType  string  `json:"dtype"`
	Shape  []int64 `json:"shape"`
	Mode   string  `json:"mode"`
	Scheme string  `json:"scheme,omitempty"`
	Axis   string  `json:"axis,omitempty"`
	Rotate string  `json:"rotate,omitempty"`
	Sink   int     `json:"sink,omitempty"`
	// GroupSize is the tensor's own group size when it differs from the codec's (version 2).
	GroupSize int `json:"group_size,omitempty"`
	// ContextLength is the original context length of a positions entry
	// (mode "positions", selection.go); its Raw payload is then the bitmap.
	ContextLength int64    `json:"context_length,omitempty"`
	Codes         *Payload `json:"codes,omitempty"`
	Scales        *Payload `json:"scales,omitempty"`
	Mins          *Payload `json:"mins,omitempty"`
	SinkP         *Payload `json:"sink_rows,omitempty"`
	Raw           *Payload `json:"raw,omitempty"`
	// Projection, when present, says the rows were projected onto a
	// low-rank basis before quantizing (section 10 of docs/format.md).
	Projection *ProjectionEntry `json:"projection,omitempty"`
}

// plan reconstructs the encoding plan of a quantized entry.
func (e *Entry) plan(group int) tensorPlan {
	return tensorPlan{Scheme: or(e.Scheme, SchemeSym), Bits: bitsOfMode(e.Mode), Axis: or(e.Axis, AxisLast),
		Rotate: or(e.Rotate, RotateNone), Sink: e.Sink, Group: or(e.GroupSize, group)}
}

// Index is the parsed, validated metadata of a container.
type Index struct {
	Version        int
	Codec          Codec
	Entries        []Entry
	SourceMetadata map[string]string
}

// IsContainer reports whether f declares itself a kv-compress container.
func IsContainer(f *safetensors.File) bool { return f.Metadata[MetaFormat] == FormatName }

func indexChecksum(codec, tensors, source string) string {
	h := crc32.New(castagnoli)
	h.Write([]byte(codec))
	h.Write([]byte{0})
	h.Write([]byte(tensors))
	h.Write([]byte{0})
	h.Write([]byte(source))
	c := h.Sum32()
	return fmt.Sprintf("%08x", c)
}

func encodeIndex(codec Codec, entries []Entry, source map[string]string) (map[string]string, error) {
	cj, err := json.Marshal(codec)
	if err != nil {
		return nil, err
	}
	tj, err := json.Marshal(entries)
	if err != nil {
		return nil, err
	}
	sj := ""
	if len(source) > 0 {
		b, err := json.Marshal(source)
		if err != nil {
			return nil, err
		}
		sj = string(b)
	}
	m := map[string]string{
		MetaFormat:        FormatName,
		MetaFormatVersion: strconv.Itoa(FormatVersion),
		MetaCodec:         string(cj),
		MetaTensors:       string(tj),
		MetaIndexChecksum: indexChecksum(string(cj), string(tj), sj),
	}
	if sj != "" {
		m[MetaSourceMetadata] = sj
	}
	return m, nil
}

// ReadIndex parses and validates a container's metadata against the payload
// tensors present in f. It checks everything that can be checked without
// reading payload bytes.
func ReadIndex(f *safetensors.File) (*Index, error) {
	if !IsContainer(f) {
		return nil, ErrNotContainer
	}
	md := f.Metadata
	v, err := strconv.Atoi(md[MetaFormatVersion])
	if err != nil || !slices.Contains(ReadableVersions, v) || md[MetaFormatVersion] != strconv.Itoa(v) {
		return nil, fmt.Errorf("%w: %q (this build reads versions %v)", ErrVersion, md[MetaFormatVersion], ReadableVersions)
	}
	if got, want := md[MetaIndexChecksum], indexChecksum(md[MetaCodec], md[MetaTensors], md[MetaSourceMetadata]); got != want {
		return nil, fmt.Errorf("%w: index checksum %q, computed %q", ErrChecksum, got, want)
	}
	idx := &Index{Version: v}
	if err := json.Unmarshal([]byte(md[MetaCodec]), &idx.Codec); err != nil {
		return nil, fmt.Errorf("%w: codec: %v", ErrCorrupt, err)
	}
	c := idx.Codec
	cfg := Config{GroupSize: c.GroupSize, Sparsity: c.Sparsity, Scheme: c.Scheme, Rotate: c.Rotate, KeyAxis: c.KeyAxis,
		Sink: c.Sink, Bits: c.Bits, KeyBits: c.KeyBits, ValueBits: c.ValueBits, Entropy: c.Entropy, Roles: c.Roles}
	if err := checkVersionedCodec(v, c); err != nil {
		return nil, err
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	if c.ScaleDType != "F16" || c.NibbleOrder != "low_first" {
		return nil, fmt.Errorf("%w: unsupported codec %+v", ErrCorrupt, c)
	}
	if err := json.Unmarshal([]byte(md[MetaTensors]), &idx.Entries); err != nil {
		return nil, fmt.Errorf("%w: tensor index: %v", ErrCorrupt, err)
	}
	if s := md[MetaSourceMetadata]; s != "" {
		if err := json.Unmarshal([]byte(s), &idx.SourceMetadata); err != nil {
			return nil, fmt.Errorf("%w: source metadata: %v", ErrCorrupt, err)
		}
	}
	payloads := make(map[string]*safetensors.Tensor, len(f.Tensors))
	for i := range f.Tensors {
		payloads[f.Tensors[i].Name] = &f.Tensors[i]
	}
	used := make(map[string]bool, len(f.Tensors))
	names := make(map[string]bool, len(idx.Entries))
	for i := range idx.Entries {
		e := &idx.Entries[i]
		if err := checkEncodings(v, e, c.GroupSize); err != nil {
			return nil, fmt.Errorf("tensor %q: %w", e.Name, err)
		}
		if err := checkEntry(payloads, e, c.GroupSize, used); err != nil {
			return nil, fmt.Errorf("tensor %q: %w", e.Name, err)
		}
		if names[e.Name] {
			return nil, fmt.Errorf("%w: tensor %q listed twice", ErrCorrupt, e.Name)
		}
		names[e.Name] = true
	}
	if err := checkPositionsIndex(idx.Entries); err != nil {
		return nil, err
	}
	for _, t := range f.Tensors {
		if !used[t.Name] {
			return nil, fmt.Errorf("%w: payload %q is not in the index", ErrCorrupt, t.Name)
		}
	}
	return idx, nil
}

// checkEntry validates one index entry against the payload tensors of the
// file (by name). Every size is computed without wrapping, and each payload's
// stored length is checked against the size its raw_bytes claims, so nothing
// is allocated from a claim the file cannot back.
func checkEntry(payloads map[string]*safetensors.Tensor, e *Entry, g int, used map[string]bool) error {
	dt, err := safetensors.ParseDType(e.DType)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	n, err := safetensors.NumElements(e.Shape)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	size, ok := safetensors.ByteSize(n, dt)
	if !ok {
		return fmt.Errorf("%w: shape %v of %s is not a whole number of bytes or does not fit in 2^62", ErrCorrupt, e.Shape, dt)
	}
	check := func(role string, p *Payload, want int64) error {
		if p == nil {
			return fmt.Errorf("%w: missing %s payload", ErrCorrupt, role)
		}
		t, ok := payloads[p.Tensor]
		if !ok {
			return fmt.Errorf("%w: %s payload %q not in file", ErrCorrupt, role, p.Tensor)
		}
		if used[p.Tensor] {
			return fmt.Errorf("%w: payload %q used twice", ErrCorrupt, p.Tensor)
		}
		used[p.Tensor] = true
		if t.DType != safetensors.U8 || len(t.Shape) != 1 {
			return fmt.Errorf("%w: payload %q must be a 1-D U8 tensor", ErrCorrupt, p.Tensor)
		}
		if p.RawBytes != want {
			return fmt.Errorf("%w: %s payload declares %d bytes, shape needs %d", ErrCorrupt, role, p.RawBytes, want)
		}
		// The stored size comes from the header: Data is not loaded when the
		// file is read with positioned reads (then p.data stays nil and the
		// bytes are read when the payload is decoded).
		switch stored := t.ByteLen(); p.Encoding {
		case EncodingStored:
			if stored != want {
				return fmt.Errorf("%w: %s payload is stored raw in %d bytes but declares %d", ErrCorrupt, role, stored, want)
			}
		case EncodingLZ4, EncodingHuff0, EncodingZstd: // every stage obeys LZ4's bound (entropy.go); versions are checked by checkEncodings
			if want > maxLZ4Expansion(stored) {
				return fmt.Errorf("%w: %s payload of %d bytes cannot expand to %d", ErrCorrupt, role, stored, want)
			}
		default:
			return fmt.Errorf("%w: unknown payload encoding %q (want one of %v)", ErrCorrupt, p.Encoding, encodingsOf(FormatVersion))
		}
		p.data = t.Data
		return nil
	}
	if e.Mode == ModePositions {
		return checkPositionsEntry(e, check)
	}
	if e.Mode == ModeStored {
		if e.Codes != nil || e.Scales != nil || e.Mins != nil || e.SinkP != nil || e.Projection != nil {
			return fmt.Errorf("%w: stored entry with quantized payloads", ErrCorrupt)
		}
		return check("raw", e.Raw, size)
	}
	bits := bitsOfMode(e.Mode)
	if bits == 0 {
		return fmt.Errorf("%w: unknown mode %q (want int2, int3, int4, int8, %q or %q)", ErrCorrupt, e.Mode, ModeStored, ModePositions)
	}
	if !dt.IsFloat() {
		return fmt.Errorf("%w: mode %s for non-float dtype %s", ErrCorrupt, e.Mode, dt)
	}
	p := e.plan(g)
	if !slices.Contains(Schemes, p.Scheme) || p.Rotate != RotateNone && p.Rotate != RotateHadamard ||
		p.Axis != AxisLast && p.Axis != AxisSeq {
		return fmt.Errorf("%w: unknown scheme %q, rotation %q or axis %q", ErrCorrupt, p.Scheme, p.Rotate, p.Axis)
	}
	if err := p.checkCodes(); err != nil {
		return fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	if n == 0 {
		return fmt.Errorf("%w: empty tensor in mode %s", ErrCorrupt, e.Mode)
	}
	if err := p.check(e.Shape); err != nil {
		return fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	if e.Raw != nil {
		return fmt.Errorf("%w: quantized entry with a raw payload", ErrCorrupt)
	}
	codes, scales, mins, sink := p.payloadSizes(e.Shape, dt.Bits()/8)
	if e.Projection != nil {
		cs, err := checkProjection(e, p)
		if err != nil {
			return err
		}
		codes, scales, mins, _ = coefPlan(p).payloadSizes(cs, 4)
		pw := int64(safetensors.DType(e.Projection.DType).Bits() / 8)
		heads, dim, rank := int64(e.Projection.Heads), e.Shape[len(e.Shape)-1], int64(e.Projection.Rank)
		if err := check("basis", e.Projection.Basis, heads*dim*rank*pw); err != nil {
			return err
		}
		if err := check("mean", e.Projection.Mean, heads*dim*pw); err != nil {
			return err
		}
	}
	if err := check("codes", e.Codes, codes); err != nil {
		return err
	}
	if err := check("scales", e.Scales, scales); err != nil {
		return err
	}
	if (mins > 0) != (e.Mins != nil) {
		return fmt.Errorf("%w: mins payload present for scheme %q: %v", ErrCorrupt, p.Scheme, e.Mins != nil)
	}
	if mins > 0 {
		if err := check("mins", e.Mins, mins); err != nil {
			return err
		}
	}
	if (sink > 0) != (e.SinkP != nil) {
		return fmt.Errorf("%w: sink payload present for sink %d: %v", ErrCorrupt, p.Sink, e.SinkP != nil)
	}
	if sink > 0 {
		return check("sink", e.SinkP, sink)
	}
	return nil
}
