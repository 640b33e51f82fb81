package safetensors

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math/bits"
	"os"
	"sort"
	"strconv"
	"unicode/utf8"
)

// Parse parses a complete safetensors file held in buf. The returned tensors'
// Data slices alias buf.
func Parse(buf []byte) (*File, error) {
	if len(buf) < 8 {
		return nil, fmt.Errorf("%w (%d bytes)", ErrTooShort, len(buf))
	}
	n, err := headerLength(buf[:8], int64(len(buf)))
	if err != nil {
		return nil, err
	}
	dataStart := 8 + n
	f, offsets, err := parseHeader(buf[8:dataStart], int64(len(buf))-dataStart)
	if err != nil {
		return nil, err
	}
	data := buf[dataStart:]
	for i := range f.Tensors {
		b, e := offsets[i][0], offsets[i][1]
		f.Tensors[i].Data = data[b:e:e]
	}
	return f, nil
}

// ReadFile reads and parses the safetensors file at path. Errors name the file.
func ReadFile(path string) (*File, error) {
	buf, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	f, err := Parse(buf)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return f, nil
}

// ReadHeader parses and validates only the header of a file of the given size,
// without reading the data buffer. The returned tensors have nil Data.
func ReadHeader(r io.ReaderAt, size int64) (*File, error) {
	var lenBuf [8]byte
	if size < 8 {
		return nil, fmt.Errorf("%w (%d bytes)", ErrTooShort, size)
	}
	if _, err := r.ReadAt(lenBuf[:], 0); err != nil {
		return nil, fmt.Errorf("safetensors: read header length: %w", err)
	}
	n, err := headerLength(lenBuf[:], size)
	if err != nil {
		return nil, err
	}
	hb := make([]byte, n)
	if _, err := r.ReadAt(hb, 8); err != nil && n > 0 {
		return nil, fmt.Errorf("safetensors: read header: %w", err)
	}
	f, _, err := parseHeader(hb, size-8-n)
	return f, err
}

func headerLength(b []byte, fileSize int64) (int64, error) {
	n := binary.LittleEndian.Uint64(b)
	if n > MaxHeaderSize {
		return 0, fmt.Errorf("%w (%d)", ErrHeaderTooLarge, n)
	}
	if int64(n) > fileSize-8 {
		return 0, fmt.Errorf("%w (header length %d, file size %d)", ErrHeaderLength, n, fileSize)
	}
	return int64(n), nil
}

// parseHeader decodes the JSON header and checks every tensor against a data
// buffer of dataLen bytes. It returns the tensors in offset order together with
// their [begin, end) offsets.
func parseHeader(hb []byte, dataLen int64) (*File, [][2]int64, error) {
	if !utf8.Valid(hb) {
		return nil, nil, ErrHeaderEncoding
	}
	if len(hb) == 0 || hb[0] != '{' {
		return nil, nil, ErrHeaderStart
	}
	entries, meta, err := decodeHeaderJSON(hb)
	if err != nil {
		return nil, nil, err
	}
	f := &File{Metadata: meta, Tensors: make([]Tensor, 0, len(entries)), HeaderSize: int64(len(hb))}
	offsets := make([][2]int64, 0, len(entries))
	for _, e := range entries {
		t, off, err := e.validate()
		if err != nil {
			return nil, nil, fmt.Errorf("tensor %q: %w", e.name, err)
		}
		f.Tensors = append(f.Tensors, t)
		offsets = append(offsets, off)
	}
	idx := make([]int, len(offsets))
	for i := range idx {
		idx[i] = i
	}
	sort.SliceStable(idx, func(a, b int) bool {
		oa, ob := offsets[idx[a]], offsets[idx[b]]
		if oa[0] != ob[0] {
			return oa[0] < ob[0]
		}
		return oa[1] < ob[1]
	})
	sortedT := make([]Tensor, len(idx))
	sortedO := make([][2]int64, len(idx))
	var end int64
	for i, j := range idx {
		sortedT[i], sortedO[i] = f.Tensors[j], offsets[j]
		if offsets[j][0] != end {
			return nil, nil, fmt.Errorf("tensor %q: %w (starts at %d, previous tensor ends at %d)",
				f.Tensors[j].Name, ErrOverlap, offsets[j][0], end)
		}
		end = offsets[j][1]
	}
	f.Tensors = sortedT
	switch {
	case end > dataLen:
		return nil, nil, fmt.Errorf("%w (tensors need %d bytes, %d present)", ErrTruncated, end, dataLen)
	case end < dataLen:
		return nil, nil, fmt.Errorf("%w (%d bytes after offset %d)", ErrTrailing, dataLen-end, end)
	}
	return f, sortedO, nil
}

type rawEntry struct {
	name    string
	dtype   *string
	shape   []json.RawMessage
	offsets []json.RawMessage
}

// decodeHeaderJSON walks the top-level object token by token so that
// duplicate keys are detected rather than silently overwritten.
func decodeHeaderJSON(hb []byte) ([]rawEntry, map[string]string, error) {
	dec := json.NewDecoder(bytes.NewReader(hb))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return nil, nil, fmt.Errorf("%w: expected an object", ErrHeaderJSON)
	}
	seen := make(map[string]bool)
	var entries []rawEntry
	var meta map[string]string
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, nil, fmt.Errorf("%w: %v", ErrHeaderJSON, err)
		}
		key, ok := tok.(string)
		if !ok {
			return nil, nil, fmt.Errorf("%w: expected a key", ErrHeaderJSON)
		}
		if seen[key] {
			return nil, nil, fmt.Errorf("%w %q", ErrDuplicate, key)
		}
		seen[key] = true
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return nil, nil, fmt.Errorf("%w: value of %q: %v", ErrHeaderJSON, key, err)
		}
		if key == MetadataKey {
			if meta, err = decodeMetadata(raw); err != nil {
				return nil, nil, err
			}
			continue
		}
		// Field names are matched exactly: encoding/json's struct decoding
		// would also accept "Dtype" or "DATA_OFFSETS".
		var info map[string]json.RawMessage
		if err := json.Unmarshal(raw, &info); err != nil || info == nil {
			return nil, nil, fmt.Errorf("tensor %q: %w: tensor info must be an object", key, ErrHeaderJSON)
		}
		e := rawEntry{name: key}
		if d, ok := info["dtype"]; ok {
			var s string
			if err := json.Unmarshal(d, &s); err != nil {
				return nil, nil, fmt.Errorf("tensor %q: %w: dtype must be a string", key, ErrDType)
			}
			e.dtype = &s
		}
		sh, ok := info["shape"]
		if !ok {
			return nil, nil, fmt.Errorf("tensor %q: %w: missing \"shape\"", key, ErrHeaderJSON)
		}
		if err := json.Unmarshal(sh, &e.shape); err != nil || e.shape == nil {
			return nil, nil, fmt.Errorf("tensor %q: %w: shape must be an array", key, ErrShape)
		}
		if off, ok := info["data_offsets"]; ok {
			if err := json.Unmarshal(off, &e.offsets); err != nil {
				return nil, nil, fmt.Errorf("tensor %q: %w: data_offsets must be an array", key, ErrOffsets)
			}
		}
		entries = append(entries, e)
	}
	if tok, err := dec.Token(); err != nil || tok != json.Delim('}') {
		return nil, nil, fmt.Errorf("%w: unterminated object", ErrHeaderJSON)
	}
	rest := hb[dec.InputOffset():]
	if len(bytes.TrimLeft(rest, " \t\r\n")) != 0 {
		return nil, nil, fmt.Errorf("%w: data after the header object", ErrHeaderJSON)
	}
	return entries, meta, nil
}

func decodeMetadata(raw json.RawMessage) (map[string]string, error) {
	if string(bytes.TrimSpace(raw)) == "null" {
		return nil, nil
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrMetadata, err)
	}
	out := make(map[string]string, len(m))
	for k, v := range m {
		var s string
		if err := json.Unmarshal(v, &s); err != nil {
			return nil, fmt.Errorf("%w: value of %q is not a string", ErrMetadata, k)
		}
		out[k] = s
	}
	return out, nil
}

// parseUint accepts only a plain non-negative JSON integer literal.
func parseUint(raw json.RawMessage) (int64, error) {
	s := string(bytes.TrimSpace(raw))
	if s == "" {
		return 0, fmt.Errorf("empty number")
	}
	if s[0] == '-' {
		return 0, fmt.Errorf("negative value %s", s)
	}
	for _, c := range []byte(s) {
		if c < '0' || c > '9' {
			return 0, fmt.Errorf("not a non-negative integer: %s", s)
		}
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%w: %s", ErrOverflow, s)
	}
	return v, nil
}

func (e rawEntry) validate() (Tensor, [2]int64, error) {
	var off [2]int64
	if e.dtype == nil {
		return Tensor{}, off, fmt.Errorf("%w: missing \"dtype\"", ErrHeaderJSON)
	}
	dt, err := ParseDType(*e.dtype)
	if err != nil {
		return Tensor{}, off, err
	}
	shape := make([]int64, len(e.shape))
	for i, r := range e.shape {
		v, err := parseUint(r)
		if err != nil {
			return Tensor{}, off, fmt.Errorf("%w: dimension %d: %v", ErrShape, i, err)
		}
		shape[i] = v
	}
	n, ok := numElements(shape)
	if !ok {
		return Tensor{}, off, fmt.Errorf("%w: shape %v", ErrOverflow, shape)
	}
	hi, nbits := bits.Mul64(uint64(n), uint64(dt.Bits()))
	if hi != 0 || nbits > 1<<62 {
		return Tensor{}, off, fmt.Errorf("%w: shape %v of %s", ErrOverflow, shape, dt)
	}
	if nbits%8 != 0 {
		return Tensor{}, off, fmt.Errorf("%w: %d elements of %s are not a whole number of bytes", ErrSizeMismatch, n, dt)
	}
	if len(e.offsets) != 2 {
		return Tensor{}, off, fmt.Errorf("%w: expected [begin, end], got %d values", ErrOffsets, len(e.offsets))
	}
	for i, r := range e.offsets {
		v, err := parseUint(r)
		if err != nil {
			return Tensor{}, off, fmt.Errorf("%w: %v", ErrOffsets, err)
		}
		off[i] = v
	}
	if off[1] < off[0] {
		return Tensor{}, off, fmt.Errorf("%w: end %d before begin %d", ErrOffsets, off[1], off[0])
	}
	if want := int64(nbits / 8); off[1]-off[0] != want {
		return Tensor{}, off, fmt.Errorf("%w: %d bytes in the offsets, %d from shape %v of %s",
			ErrSizeMismatch, off[1]-off[0], want, shape, dt)
	}
	return Tensor{Name: e.name, DType: dt, Shape: shape}, off, nil
}

// numElements multiplies the dimensions, reporting false on overflow past 2^62.
func numElements(shape []int64) (int64, bool) {
	n := uint64(1)
	for _, d := range shape {
		hi, lo := bits.Mul64(n, uint64(d))
		if hi != 0 || lo > 1<<62 {
			return 0, false
		}
		n = lo
	}
	return int64(n), true
}
