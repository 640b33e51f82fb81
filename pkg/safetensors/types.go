// Package safetensors reads and writes files in the safetensors format.
//
// A file is an 8-byte little-endian header length N, N bytes of a UTF-8 JSON
// object, then the data buffer. The JSON maps tensor names to
// {"dtype", "shape", "data_offsets"} and may hold a "__metadata__" map of
// strings. Offsets are relative to the data buffer; the tensors must tile it
// exactly: contiguous from 0, no overlaps, no holes, nothing after the last.
//
// Reading only parses and validates. Every rule is checked before any tensor
// is handed out, so a File returned without error is internally consistent.
// Input is treated as untrusted: malformed files produce errors wrapping one of
// the Err* sentinels below, never a panic.
package safetensors

import (
	"errors"
	"fmt"
	"math/bits"
)

// MaxHeaderSize is the largest header length accepted, as in the reference implementation.
const MaxHeaderSize = 100_000_000

// MetadataKey is the reserved header key that holds the free-form string map.
const MetadataKey = "__metadata__"

// Errors returned (wrapped with context) by the reader and writer.
var (
	ErrHeaderTooLarge = errors.New("safetensors: header length exceeds 100000000 bytes")
	ErrHeaderLength   = errors.New("safetensors: header length points past the end of the file")
	ErrTooShort       = errors.New("safetensors: file shorter than the 8-byte header length")
	ErrHeaderEncoding = errors.New("safetensors: header is not valid UTF-8")
	ErrHeaderStart    = errors.New("safetensors: header does not start with '{'")
	ErrHeaderJSON     = errors.New("safetensors: header is not a valid JSON object")
	ErrDuplicate      = errors.New("safetensors: duplicate tensor name")
	ErrMetadata       = errors.New("safetensors: __metadata__ must map strings to strings")
	ErrDType          = errors.New("safetensors: unknown dtype")
	ErrShape          = errors.New("safetensors: invalid shape")
	ErrOffsets        = errors.New("safetensors: invalid data offsets")
	ErrOverflow       = errors.New("safetensors: tensor size overflows")
	ErrSizeMismatch   = errors.New("safetensors: byte length disagrees with shape and dtype")
	ErrOverlap        = errors.New("safetensors: tensors overlap or leave a hole in the data buffer")
	ErrTruncated      = errors.New("safetensors: data buffer is truncated")
	ErrTrailing       = errors.New("safetensors: trailing bytes after the last tensor")
	ErrName           = errors.New("safetensors: invalid tensor name")
)

// DType names an element type exactly as it is spelled in the header.
type DType string

// The element types of the safetensors format.
const (
	BOOL   DType = "BOOL"
	U8     DType = "U8"
	I8     DType = "I8"
	F8E5M2 DType = "F8_E5M2"
	F8E4M3 DType = "F8_E4M3"
	F8E8M0 DType = "F8_E8M0"
	I16    DType = "I16"
	U16    DType = "U16"
	F16    DType = "F16"
	BF16   DType = "BF16"
	I32    DType = "I32"
	U32    DType = "U32"
	F32    DType = "F32"
	F64    DType = "F64"
	I64    DType = "I64"
	U64    DType = "U64"
	C64    DType = "C64"
	F4     DType = "F4"
	F6E2M3 DType = "F6_E2M3"
	F6E3M2 DType = "F6_E3M2"
)

var dtypeBits = map[DType]int{
	BOOL: 8, U8: 8, I8: 8, F8E5M2: 8, F8E4M3: 8, F8E8M0: 8,
	I16: 16, U16: 16, F16: 16, BF16: 16,
	I32: 32, U32: 32, F32: 32,
	F64: 64, I64: 64, U64: 64, C64: 64,
	F4: 4, F6E2M3: 6, F6E3M2: 6,
}

// ParseDType returns the DType for a header spelling. Spellings are
// case-sensitive: "f16" is rejected.
func ParseDType(s string) (DType, error) {
	d := DType(s)
	if _, ok := dtypeBits[d]; !ok {
		return "", fmt.Errorf("%w %q", ErrDType, s)
	}
	return d, nil
}

// Bits is the storage width of one element in bits (4 and 6 for the packed
// float types, 0 for an unknown dtype). A switch, not a map lookup: it sits on
// hot paths.
func (d DType) Bits() int {
	switch d {
	case F16, BF16, I16, U16:
		return 16
	case F32, I32, U32:
		return 32
	case BOOL, U8, I8, F8E5M2, F8E4M3, F8E8M0:
		return 8
	case F64, I64, U64, C64:
		return 64
	case F4:
		return 4
	case F6E2M3, F6E3M2:
		return 6
	}
	return 0
}

// Valid reports whether d is one of the known element types.
func (d DType) Valid() bool { _, ok := dtypeBits[d]; return ok }

// IsFloat reports whether d is F16, BF16, F32 or F64: the types this package
// converts to and from float32.
func (d DType) IsFloat() bool { return d == F16 || d == BF16 || d == F32 || d == F64 }

// Tensor is one named tensor. Data holds its raw little-endian bytes; for a
// tensor obtained from a File it aliases the file's buffer.
type Tensor struct {
	Name  string
	DType DType
	Shape []int64
	Data  []byte
}

// NumElements is the product of the shape (1 for a scalar).
func (t *Tensor) NumElements() int64 {
	n, _ := numElements(t.Shape)
	return n
}

// NumElements returns the product of shape, or an error wrapping ErrShape
// for a negative dimension and ErrOverflow when the product exceeds 2^62.
func NumElements(shape []int64) (int64, error) {
	for _, d := range shape {
		if d < 0 {
			return 0, fmt.Errorf("%w: negative dimension in %v", ErrShape, shape)
		}
	}
	n, ok := numElements(shape)
	if !ok {
		return 0, fmt.Errorf("%w: shape %v", ErrOverflow, shape)
	}
	return n, nil
}

// ByteSize returns the bytes that n elements of dt occupy, and false when
// that is not a whole number of bytes or does not fit in 2^62 bytes: the
// product n · bits is computed without wrapping, so a huge shape cannot pass
// for a small one.
func ByteSize(n int64, dt DType) (int64, bool) {
	if n < 0 || dt.Bits() == 0 {
		return 0, false
	}
	hi, nbits := bits.Mul64(uint64(n), uint64(dt.Bits()))
	if hi != 0 || nbits > 1<<62 || nbits%8 != 0 {
		return 0, false
	}
	return int64(nbits / 8), true
}

// File is a parsed safetensors file. Tensors are in data-offset order.
type File struct {
	Metadata map[string]string
	Tensors  []Tensor
	// HeaderSize is the JSON header's length in bytes, padding included.
	HeaderSize int64
	// byName maps each name to its index in Tensors; Parse and ReadHeader
	// fill it. A File built by hand has none and is searched linearly.
	byName map[string]int
}

// Lookup returns the tensor with the given name: through the name index of
// a parsed file (constant time, safe for concurrent use), by a linear search
// for a File built by hand or whose Tensors were rearranged since parsing.
func (f *File) Lookup(name string) (*Tensor, bool) {
	if i, ok := f.byName[name]; ok && i < len(f.Tensors) && f.Tensors[i].Name == name {
		return &f.Tensors[i], true
	}
	for i := range f.Tensors {
		if f.Tensors[i].Name == name {
			return &f.Tensors[i], true
		}
	}
	return nil, false
}
