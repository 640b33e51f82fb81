package safetensors

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math/bits"
	"os"
	"slices"
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
//
// Its memory is a small multiple of the header: each tensor is validated as
// soon as its entry is read and kept only as a Tensor and its offsets, and one
// map serves both to detect duplicate names and for File.Lookup.
func parseHeader(hb []byte, dataLen int64) (*File, [][2]int64, error) {
	if !utf8.Valid(hb) {
		return nil, nil, ErrHeaderEncoding
	}
	if len(hb) == 0 || hb[0] != '{' {
		return nil, nil, ErrHeaderStart
	}
	if !json.Valid(hb) {
		var v json.RawMessage
		err := json.Unmarshal(hb, &v) // only to say where the syntax breaks
		return nil, nil, fmt.Errorf("%w: %v", ErrHeaderJSON, err)
	}
	f := &File{HeaderSize: int64(len(hb)), byName: make(map[string]int)}
	var offsets [][2]int64
	sc := &scanner{b: hb}
	metaSeen := false
	err := sc.members(func(key string) error {
		if key == MetadataKey {
			if metaSeen {
				return fmt.Errorf("%w %q", ErrDuplicate, key)
			}
			metaSeen = true
			var err error
			f.Metadata, err = sc.metadata()
			return err
		}
		if _, dup := f.byName[key]; dup {
			return fmt.Errorf("%w %q", ErrDuplicate, key)
		}
		e, err := sc.entry(key)
		if err != nil {
			return err
		}
		t, off, err := e.validate()
		if err != nil {
			return fmt.Errorf("tensor %q: %w", key, err)
		}
		f.byName[key] = len(f.Tensors)
		f.Tensors = append(f.Tensors, t)
		offsets = append(offsets, off)
		return nil
	})
	if err != nil {
		return nil, nil, err
	}
	// Writers lay tensors out in header order, so sorting is rarely needed.
	sorted := slices.IsSortedFunc(offsets, cmpOffsets)
	if !sorted {
		order := make([]int, len(offsets))
		for i := range order {
			order[i] = i
		}
		slices.SortStableFunc(order, func(a, b int) int { return cmpOffsets(offsets[a], offsets[b]) })
		ts, offs := make([]Tensor, len(order)), make([][2]int64, len(order))
		for i, j := range order {
			ts[i], offs[i] = f.Tensors[j], offsets[j]
			f.byName[ts[i].Name] = i
		}
		f.Tensors, offsets = ts, offs
	}
	var end int64
	for i, off := range offsets {
		if off[0] != end {
			return nil, nil, fmt.Errorf("tensor %q: %w (starts at %d, previous tensor ends at %d)",
				f.Tensors[i].Name, ErrOverlap, off[0], end)
		}
		end = off[1]
	}
	switch {
	case end > dataLen:
		return nil, nil, fmt.Errorf("%w (tensors need %d bytes, %d present)", ErrTruncated, end, dataLen)
	case end < dataLen:
		return nil, nil, fmt.Errorf("%w (%d bytes after offset %d)", ErrTrailing, dataLen-end, end)
	}
	return f, offsets, nil
}

func cmpOffsets(a, b [2]int64) int {
	if c := cmp.Compare(a[0], b[0]); c != 0 {
		return c
	}
	return cmp.Compare(a[1], b[1])
}

type rawEntry struct {
	name    string
	dtype   *string
	shape   []json.RawMessage
	offsets []json.RawMessage
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
