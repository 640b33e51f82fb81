package compression

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"regexp"
	"slices"
	"strconv"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// Token selection (docs/format.md, section 9). A cache whose context was cut
// down to a subset of its positions carries, per layer, a tensor
// layer_{i}_positions of dtype I32 and shape [..., kept] (the key's shape
// without its last axis): the original index of every kept position, strictly
// increasing along the last axis, each in [0, context_length). The input's
// __metadata__ names the original context length under MetaContextLength.
// The container stores each positions tensor as a bitmap of context_length
// bits per row (mode "positions"), and decompress restores the I32 indices.

// ErrSelection marks an input whose token selection (positions tensors or
// their context length) is invalid: indices out of range, unsorted or
// repeated, a shape that does not match the layer's keys, or no context length.
var ErrSelection = errors.New("compression: invalid token selection")

// ModePositions is the mode of a positions tensor: a bitmap of the kept positions.
const ModePositions = "positions"

// SuffixBitmap names a positions entry's payload (held in the entry's raw field).
const SuffixBitmap = ".bitmap"

// MetaContextLength is the input metadata key that gives the original context
// length of a cache with positions tensors, as a decimal integer.
const MetaContextLength = "context_length"

// MaxContextLength bounds context_length: indices are int32.
const MaxContextLength = 1<<31 - 1

var positionsName = regexp.MustCompile(`^layer_(0|[1-9][0-9]*)_positions$`)

// IsPositions reports whether name is a positions tensor's name (layer_{i}_positions).
func IsPositions(name string) bool { return positionsName.MatchString(name) }

// positionsLayer returns the layer prefix "layer_{i}" of a positions tensor's name.
func positionsLayer(name string) string { return name[:len(name)-len("_positions")] }

// checkSelectionInput validates the positions tensors of an input file
// against its keys, values and metadata, before anything is encoded, and
// returns the context length (0 when the file has no positions tensor).
// The indices themselves are checked as each tensor is encoded.
func checkSelectionInput(f *safetensors.File) (int64, error) {
	shapes := make(map[string][]int64, len(f.Tensors))
	var names []string
	for i := range f.Tensors {
		t := &f.Tensors[i]
		shapes[t.Name] = t.Shape
		if IsPositions(t.Name) {
			names = append(names, t.Name)
			if t.DType != safetensors.I32 {
				return 0, fmt.Errorf("%w: %s has dtype %s, want I32", ErrSelection, t.Name, t.DType)
			}
		}
	}
	if len(names) == 0 {
		return 0, nil
	}
	raw, ok := f.Metadata[MetaContextLength]
	if !ok {
		return 0, fmt.Errorf("%w: %s needs the original context length in the input's __metadata__ %q", ErrSelection, names[0], MetaContextLength)
	}
	ctx, err := strconv.ParseInt(raw, 10, 64)
	if err != nil || ctx < 1 || ctx > MaxContextLength || strconv.FormatInt(ctx, 10) != raw {
		return 0, fmt.Errorf("%w: __metadata__ %q is %q, want an integer in [1, %d]", ErrSelection, MetaContextLength, raw, int64(MaxContextLength))
	}
	for _, name := range names {
		if err := matchLayer(name, shapes[name], shapes, ctx); err != nil {
			return 0, err
		}
	}
	return ctx, nil
}

// matchLayer checks a positions tensor's shape against its layer's key and
// value ([..., kept, D] with the same leading axes) and the context length.
func matchLayer(name string, shape []int64, shapes map[string][]int64, ctx int64) error {
	if len(shape) < 1 {
		return fmt.Errorf("%w: %s must have at least one axis, got shape %v", ErrSelection, name, shape)
	}
	if kept := shape[len(shape)-1]; kept > ctx {
		return fmt.Errorf("%w: %s keeps %d positions of a context of %d", ErrSelection, name, kept, ctx)
	}
	for _, role := range []string{"key", "value"} {
		other := positionsLayer(name) + "_" + role
		s, ok := shapes[other]
		if !ok {
			return fmt.Errorf("%w: %s has no %s beside it", ErrSelection, name, other)
		}
		if len(s) != len(shape)+1 || !slices.Equal(s[:len(shape)], shape) {
			return fmt.Errorf("%w: %s has shape %v but %s has %v (want the positions' shape plus head_dim)",
				ErrSelection, name, shape, other, s)
		}
	}
	return nil
}

// bitmapRowBytes is the bytes of one row's bitmap: ceil(ctx / 8).
func bitmapRowBytes(ctx int64) int64 { return (ctx + 7) / 8 }

// encodePositions turns the I32 indices data (rows × kept values) into a
// bitmap of rowBytes(ctx) bytes per row, refusing an index out of
// [0, ctx), or one not greater than the index before it.
func encodePositions(name string, data []byte, rows, kept, ctx int64) ([]byte, error) {
	rb := bitmapRowBytes(ctx)
	out := make([]byte, rows*rb)
	for r := range rows {
		prev := int64(-1)
		row := out[r*rb : (r+1)*rb]
		for j := range kept {
			v := int64(int32(binary.LittleEndian.Uint32(data[4*(r*kept+j):])))
			switch {
			case v < 0 || v >= ctx:
				return nil, fmt.Errorf("%w: %s row %d index %d is %d, outside [0, %d)", ErrSelection, name, r, j, v, ctx)
			case v == prev:
				return nil, fmt.Errorf("%w: %s row %d repeats position %d", ErrSelection, name, r, v)
			case v < prev:
				return nil, fmt.Errorf("%w: %s row %d is not sorted: %d after %d", ErrSelection, name, r, v, prev)
			}
			row[v/8] |= 1 << (v % 8)
			prev = v
		}
	}
	return out, nil
}

// compressPositions encodes a positions tensor (already checked by
// checkSelectionInput) as its bitmap, through the entropy stage.
func compressPositions(t *safetensors.Tensor, ctx int64, ws *workerScratch, ct compressedTensor) (compressedTensor, error) {
	if ctx <= 0 {
		return ct, fmt.Errorf("%w: %s needs the original context length in the input's __metadata__ %q", ErrSelection, t.Name, MetaContextLength)
	}
	rows, err := safetensors.NumElements(t.Shape[:len(t.Shape)-1])
	if err != nil {
		return ct, err
	}
	bitmap, err := encodePositions(t.Name, t.Data, rows, t.Shape[len(t.Shape)-1], ctx)
	if err != nil {
		return ct, err
	}
	data, enc := ws.pe.encode(bitmap)
	p := Payload{Tensor: t.Name + SuffixBitmap, Encoding: enc, RawBytes: int64(len(bitmap)), CRC32C: checksum(data)}
	ct.entry.Mode, ct.entry.ContextLength, ct.entry.Raw = ModePositions, ctx, &p
	ct.payload = []safetensors.Tensor{u8Tensor(p.Tensor, data)}
	ct.report.Mode, ct.report.CompressedBytes = ModePositions, int64(len(data))
	ct.report.Quality = tensorStats{}.quality()
	return ct, nil
}

// checkPositionsEntry validates a positions entry of an index: dtype, shape,
// context length, and a bitmap payload of exactly the size they imply.
func checkPositionsEntry(e *Entry, check func(role string, p *Payload, want int64) error) error {
	if e.DType != string(safetensors.I32) {
		return fmt.Errorf("%w: positions entry of dtype %s (want I32)", ErrCorrupt, e.DType)
	}
	if !IsPositions(e.Name) {
		return fmt.Errorf("%w: mode %q on a tensor not named layer_{i}_positions", ErrCorrupt, ModePositions)
	}
	if len(e.Shape) < 1 {
		return fmt.Errorf("%w: positions entry of shape %v", ErrCorrupt, e.Shape)
	}
	if e.ContextLength < 1 || e.ContextLength > MaxContextLength || e.Shape[len(e.Shape)-1] > e.ContextLength {
		return fmt.Errorf("%w: context_length %d for %d kept positions (want %d to %d)", ErrCorrupt,
			e.ContextLength, e.Shape[len(e.Shape)-1], e.Shape[len(e.Shape)-1], int64(MaxContextLength))
	}
	if e.Codes != nil || e.Scales != nil || e.Mins != nil || e.SinkP != nil || e.Scheme != "" || e.Axis != "" ||
		e.Rotate != "" || e.Sink != 0 || e.GroupSize != 0 {
		return fmt.Errorf("%w: positions entry with quantization fields", ErrCorrupt)
	}
	rows, err := safetensors.NumElements(e.Shape[:len(e.Shape)-1])
	if err != nil {
		return fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	rb := bitmapRowBytes(e.ContextLength)
	if rows > 0 && rb > (1<<62)/rows {
		return fmt.Errorf("%w: bitmap of %d rows of %d bytes does not fit in 2^62", ErrCorrupt, rows, rb)
	}
	return check("bitmap", e.Raw, rows*rb)
}

// checkPositionsIndex checks that each positions entry of an index sits beside
// its layer's key and value entries with matching shapes, and that no other
// entry carries a context length.
func checkPositionsIndex(entries []Entry) error {
	shapes := make(map[string][]int64, len(entries))
	for i := range entries {
		shapes[entries[i].Name] = entries[i].Shape
	}
	for i := range entries {
		e := &entries[i]
		if e.Mode != ModePositions {
			if e.ContextLength != 0 {
				return fmt.Errorf("%w: tensor %q of mode %q has a context_length", ErrCorrupt, e.Name, e.Mode)
			}
			continue
		}
		if err := matchLayer(e.Name, e.Shape, shapes, e.ContextLength); err != nil {
			return fmt.Errorf("%w: %v", ErrCorrupt, err)
		}
	}
	return nil
}

// decodePositions expands a positions entry's bitmap into its I32 indices in
// data, refusing a row whose count of set bits is not the kept count or
// whose padding bits are set.
func decodePositions(src *source, e *Entry, data []byte, s *decompressScratch) error {
	s.parts[0] = grow(s.parts[0][:0], int(e.Raw.RawBytes))
	bitmap := s.parts[0]
	if err := readPayload(src, e.Raw, bitmap, &s.in); err != nil {
		return err
	}
	kept := e.Shape[len(e.Shape)-1]
	rb := bitmapRowBytes(e.ContextLength)
	rows := int64(len(bitmap)) / max(rb, 1)
	if pad := e.ContextLength % 8; pad != 0 {
		for r := range rows {
			if bitmap[(r+1)*rb-1]>>pad != 0 {
				return fmt.Errorf("%w: positions row %d sets bits past context_length %d", ErrCorrupt, r, e.ContextLength)
			}
		}
	}
	for r := range rows {
		row := bitmap[r*rb : (r+1)*rb]
		count := int64(0)
		for _, b := range row {
			count += int64(bits.OnesCount8(b))
		}
		if count != kept {
			return fmt.Errorf("%w: positions row %d has %d positions set, shape says %d", ErrCorrupt, r, count, kept)
		}
		out := data[4*r*kept : 4*(r+1)*kept]
		k := 0
		for byteIdx, b := range row {
			for b != 0 {
				bit := bits.TrailingZeros8(b)
				binary.LittleEndian.PutUint32(out[4*k:], uint32(byteIdx*8+bit))
				k++
				b &= b - 1
			}
		}
	}
	return nil
}
