package safetensors

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strconv"

	"github.com/kv-cache-p2p/validation/pkg/atomicfile"
)

// headerAlign is the alignment of the data buffer; the header is padded with
// spaces to a multiple of it, as the reference implementation does.
const headerAlign = 8

// EncodeHeader returns the padded JSON header for tensors laid out in the given
// order, and the total size of their data.
func EncodeHeader(tensors []Tensor, metadata map[string]string) ([]byte, int64, error) {
	var hb bytes.Buffer
	hb.WriteByte('{')
	first := true
	sep := func() {
		if !first {
			hb.WriteByte(',')
		}
		first = false
	}
	if len(metadata) > 0 {
		sep()
		keys := make([]string, 0, len(metadata))
		for k := range metadata {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		hb.WriteString(`"` + MetadataKey + `":{`)
		for i, k := range keys {
			if i > 0 {
				hb.WriteByte(',')
			}
			writeJSONString(&hb, k)
			hb.WriteByte(':')
			writeJSONString(&hb, metadata[k])
		}
		hb.WriteByte('}')
	}
	seen := make(map[string]bool, len(tensors))
	var off int64
	for i := range tensors {
		t := &tensors[i]
		if t.Name == MetadataKey {
			return nil, 0, fmt.Errorf("%w: %q is reserved", ErrName, t.Name)
		}
		if seen[t.Name] {
			return nil, 0, fmt.Errorf("%w %q", ErrDuplicate, t.Name)
		}
		seen[t.Name] = true
		if !t.DType.Valid() {
			return nil, 0, fmt.Errorf("tensor %q: %w %q", t.Name, ErrDType, t.DType)
		}
		n, ok := numElements(t.Shape)
		if !ok {
			return nil, 0, fmt.Errorf("tensor %q: %w", t.Name, ErrOverflow)
		}
		for _, d := range t.Shape {
			if d < 0 {
				return nil, 0, fmt.Errorf("tensor %q: %w: negative dimension", t.Name, ErrShape)
			}
		}
		if n > (1<<62)/int64(t.DType.Bits()) { // the byte size would not fit: refuse rather than wrap
			return nil, 0, fmt.Errorf("tensor %q: %w: shape %v of %s", t.Name, ErrOverflow, t.Shape, t.DType)
		}
		if size, ok := ByteSize(n, t.DType); !ok || size != int64(len(t.Data)) {
			return nil, 0, fmt.Errorf("tensor %q: %w: %d bytes for shape %v of %s", t.Name, ErrSizeMismatch, len(t.Data), t.Shape, t.DType)
		}
		sep()
		writeJSONString(&hb, t.Name)
		hb.WriteString(`:{"dtype":"` + string(t.DType) + `","shape":[`)
		for j, d := range t.Shape {
			if j > 0 {
				hb.WriteByte(',')
			}
			hb.WriteString(strconv.FormatInt(d, 10))
		}
		end := off + int64(len(t.Data))
		hb.WriteString(`],"data_offsets":[` + strconv.FormatInt(off, 10) + "," + strconv.FormatInt(end, 10) + "]}")
		off = end
	}
	hb.WriteByte('}')
	for hb.Len()%headerAlign != 0 {
		hb.WriteByte(' ')
	}
	if hb.Len() > MaxHeaderSize {
		return nil, 0, fmt.Errorf("%w (%d)", ErrHeaderTooLarge, hb.Len())
	}
	return hb.Bytes(), off, nil
}

func writeJSONString(b *bytes.Buffer, s string) {
	enc, _ := json.Marshal(s) // strings always marshal
	b.Write(enc)
}

// Encode writes a safetensors file holding tensors (laid out in the given
// order) and metadata to w.
func Encode(w io.Writer, tensors []Tensor, metadata map[string]string) error {
	hb, _, err := EncodeHeader(tensors, metadata)
	if err != nil {
		return err
	}
	var lenBuf [8]byte
	binary.LittleEndian.PutUint64(lenBuf[:], uint64(len(hb)))
	if _, err := w.Write(lenBuf[:]); err != nil {
		return err
	}
	if _, err := w.Write(hb); err != nil {
		return err
	}
	for i := range tensors {
		if _, err := w.Write(tensors[i].Data); err != nil {
			return err
		}
	}
	return nil
}

// WriteFile writes a safetensors file atomically: path holds either its old
// content or the complete new file, never a partial one.
func WriteFile(path string, tensors []Tensor, metadata map[string]string) error {
	return atomicfile.Write(path, func(w io.Writer) error { return Encode(w, tensors, metadata) })
}
