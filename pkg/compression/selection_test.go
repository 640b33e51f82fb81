package compression

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"slices"
	"strconv"
	"testing"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// i32Bytes encodes int32 values little-endian.
func i32Bytes(v []int32) []byte {
	b := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(b[4*i:], uint32(x))
	}
	return b
}

// selectedCache is a synthetic cache of layers × [1, heads, kept, dim] with a
// positions tensor per layer: rows of kept sorted indices drawn from [0, ctx).
func selectedCache(tb testing.TB, layers, heads, kept, dim int, ctx int64, seed uint64) *safetensors.File {
	tb.Helper()
	f := kvCache(tb, layers, heads, kept, dim, safetensors.F16, seed)
	rng := rand.New(rand.NewPCG(seed, 5))
	var tensors []safetensors.Tensor
	for l := range layers {
		var idx []int32
		for range heads {
			perm := rng.Perm(int(ctx))[:kept]
			row := make([]int32, kept)
			for j, p := range perm {
				row[j] = int32(p)
			}
			slices.Sort(row)
			idx = append(idx, row...)
		}
		tensors = append(tensors, f.Tensors[2*l], f.Tensors[2*l+1], safetensors.Tensor{
			Name: "layer_" + itoa(l) + "_positions", DType: safetensors.I32, Shape: []int64{1, int64(heads), int64(kept)}, Data: i32Bytes(idx)})
	}
	f.Tensors = tensors
	f.Metadata[MetaContextLength] = strconv.FormatInt(ctx, 10)
	return f
}

// TestSelectionRoundTrip: the positions come back exactly, the keys and
// values exactly as without positions, and the report counts the positions
// neither as quantized nor as float16 cache.
func TestSelectionRoundTrip(t *testing.T) {
	tests := []struct {
		name            string
		kept, ctx, dims int
	}{
		{"half of 40", 20, 40, 64},
		{"all of 33 (padding bits)", 33, 33, 64},
		{"one of 9", 1, 9, 64},
		{"none of 16", 0, 16, 64},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			src := selectedCache(t, 2, 3, tc.kept, tc.dims, int64(tc.ctx), 11)
			res, err := Compress(src, DefaultConfig())
			if err != nil {
				t.Fatal(err)
			}
			plain := &safetensors.File{Metadata: src.Metadata}
			for _, tn := range src.Tensors {
				if !IsPositions(tn.Name) {
					plain.Tensors = append(plain.Tensors, tn)
				}
			}
			ref, err := Compress(plain, DefaultConfig())
			if err != nil {
				t.Fatal(err)
			}
			got, err := Decompress(asContainer(t, res), 2)
			if err != nil {
				t.Fatal(err)
			}
			want, err := Decompress(asContainer(t, ref), 2)
			if err != nil {
				t.Fatal(err)
			}
			k := 0
			for _, tn := range got.Tensors {
				if IsPositions(tn.Name) {
					orig, _ := src.Lookup(tn.Name)
					if tn.DType != safetensors.I32 || !slices.Equal(tn.Shape, orig.Shape) || !bytes.Equal(tn.Data, orig.Data) {
						t.Fatalf("%s: restored %s %v, not the original indices", tn.Name, tn.DType, tn.Shape)
					}
					continue
				}
				if w := want.Tensors[k]; w.Name != tn.Name || !bytes.Equal(w.Data, tn.Data) {
					t.Fatalf("%s: differs from the same cache compressed without positions", tn.Name)
				}
				k++
			}
			if got.Metadata[MetaContextLength] != strconv.Itoa(tc.ctx) {
				t.Fatalf("source metadata %v lost the context length", got.Metadata)
			}
			r := NewReport(res, 0, 0, 0)
			wantQ := 4 // empty keys and values are stored, not quantized
			if tc.kept == 0 {
				wantQ = 0
			}
			if r.QuantizedTensors != wantQ || r.StoredTensors != 6-wantQ {
				t.Fatalf("quantized %d, stored %d tensors; want %d and %d", r.QuantizedTensors, r.StoredTensors, wantQ, 6-wantQ)
			}
			// originalSize 0: FP16SizeBytes holds only the adjustments, and the
			// positions' bytes are taken out of the float16 size.
			if rr := NewReport(ref, 0, 0, 0); rr.FP16SizeBytes != r.FP16SizeBytes+positionsBytes(src) {
				t.Fatalf("float16 size %d with positions, %d without", r.FP16SizeBytes, rr.FP16SizeBytes)
			}
		})
	}
}

// positionsBytes is the size of a file's positions tensors.
func positionsBytes(f *safetensors.File) int64 {
	var n int64
	for _, t := range f.Tensors {
		if IsPositions(t.Name) {
			n += int64(len(t.Data))
		}
	}
	return n
}

// TestSelectionInputRefused: bad indices, shapes, dtypes and context lengths
// are refused by compress with ErrSelection (exit 3), naming the tensor.
func TestSelectionInputRefused(t *testing.T) {
	set := func(f *safetensors.File, name string, fn func(t *safetensors.Tensor)) {
		for i := range f.Tensors {
			if f.Tensors[i].Name == name {
				fn(&f.Tensors[i])
			}
		}
	}
	setIdx := func(j int, v int32) func(*safetensors.File) {
		return func(f *safetensors.File) {
			set(f, "layer_1_positions", func(t *safetensors.Tensor) { binary.LittleEndian.PutUint32(t.Data[4*j:], uint32(v)) })
		}
	}
	tests := []struct {
		name   string
		mutate func(f *safetensors.File)
		want   string
	}{
		{"index past the context", setIdx(5, 40), "outside [0, 40)"},
		{"negative index", setIdx(0, -1), "outside [0, 40)"},
		{"unsorted", func(f *safetensors.File) {
			set(f, "layer_1_positions", func(t *safetensors.Tensor) {
				a, b := binary.LittleEndian.Uint32(t.Data[8:]), binary.LittleEndian.Uint32(t.Data[12:])
				binary.LittleEndian.PutUint32(t.Data[8:], b)
				binary.LittleEndian.PutUint32(t.Data[12:], a)
			})
		}, "not sorted"},
		{"duplicated", func(f *safetensors.File) {
			set(f, "layer_1_positions", func(t *safetensors.Tensor) { copy(t.Data[12:16], t.Data[8:12]) })
		}, "repeats position"},
		{"no context length", func(f *safetensors.File) { delete(f.Metadata, MetaContextLength) }, "context length"},
		{"context length not a number", func(f *safetensors.File) { f.Metadata[MetaContextLength] = "40.0" }, "want an integer"},
		{"context length zero", func(f *safetensors.File) { f.Metadata[MetaContextLength] = "0" }, "want an integer"},
		{"more kept than the context", func(f *safetensors.File) { f.Metadata[MetaContextLength] = "10" }, "keeps 20 positions of a context of 10"},
		{"I64 positions", func(f *safetensors.File) {
			set(f, "layer_0_positions", func(t *safetensors.Tensor) {
				t.DType, t.Data = safetensors.I64, append(t.Data, t.Data...)
			})
		}, "want I32"},
		{"shape unlike the keys", func(f *safetensors.File) {
			set(f, "layer_0_positions", func(t *safetensors.Tensor) { t.Shape = []int64{1, 6, 10} })
		}, "plus head_dim"},
		{"no keys beside it", func(f *safetensors.File) {
			set(f, "layer_0_key", func(t *safetensors.Tensor) { t.Name = "other" })
		}, "has no layer_0_key"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			src := selectedCache(t, 2, 3, 20, 64, 40, 4)
			tc.mutate(src)
			_, err := Compress(src, DefaultConfig())
			if !errors.Is(err, ErrSelection) || !bytes.Contains([]byte(err.Error()), []byte(tc.want)) {
				t.Fatalf("err = %v, want ErrSelection saying %q", err, tc.want)
			}
		})
	}
}

// TestSelectionContainerRefused: a container whose positions entry lies (bits
// set past the context, a row count unlike the shape, a context length on
// another entry, no keys beside it) is refused as corrupt, checksums intact.
func TestSelectionContainerRefused(t *testing.T) {
	good := func(t *testing.T) *Result {
		res, err := Compress(selectedCache(t, 1, 2, 3, 64, 12, 8), DefaultConfig())
		if err != nil {
			t.Fatal(err)
		}
		return res
	}
	bitmapOf := func(res *Result) int {
		for i, tn := range res.Tensors {
			if tn.Name == "layer_0_positions"+SuffixBitmap {
				return i
			}
		}
		return -1
	}
	tests := []struct {
		name   string
		mutate func(entries []Entry, res *Result)
		want   string
	}{
		{"bit past the context", func(_ []Entry, res *Result) { rawBitmap(res, bitmapOf(res))[1] |= 0x80 }, "past context_length"},
		{"a row with one position too many", func(_ []Entry, res *Result) { rawBitmap(res, bitmapOf(res))[0] ^= 0xff }, "positions set"},
		{"context length on a key", func(e []Entry, _ *Result) { e[0].ContextLength = 12 }, "has a context_length"},
		{"context length below kept", func(e []Entry, _ *Result) { e[2].ContextLength = 2 }, "context_length 2"},
		{"positions of an F16 tensor", func(e []Entry, _ *Result) { e[2].DType = "F16" }, "want I32"},
		{"positions not named so", func(e []Entry, _ *Result) { e[2].Name = "layer_0_ids" }, "not named"},
		{"shape unlike the keys", func(e []Entry, _ *Result) { e[2].Shape = []int64{2, 3} }, "plus head_dim"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			res := good(t)
			var entries []Entry
			if err := json.Unmarshal([]byte(res.Metadata[MetaTensors]), &entries); err != nil {
				t.Fatal(err)
			}
			tc.mutate(entries, res)
			for i := range entries { // repair the checksums: only the claims are hostile
				if p := entries[i].Raw; p != nil {
					for _, tn := range res.Tensors {
						if tn.Name == p.Tensor {
							p.CRC32C = checksum(tn.Data)
						}
					}
				}
			}
			tj, _ := json.Marshal(entries)
			res.Metadata[MetaTensors] = string(tj)
			res.Metadata[MetaIndexChecksum] = indexChecksum(res.Metadata[MetaCodec], string(tj), res.Metadata[MetaSourceMetadata])
			_, err := Decompress(asContainer(t, res), 1)
			if !errors.Is(err, ErrCorrupt) || !bytes.Contains([]byte(err.Error()), []byte(tc.want)) {
				t.Fatalf("err = %v, want ErrCorrupt saying %q", err, tc.want)
			}
		})
	}
}

// rawBitmap returns the bitmap payload's bytes, which must be stored raw for
// the test to edit them (a 12-position bitmap is too small for a stage).
func rawBitmap(res *Result, i int) []byte {
	return res.Tensors[i].Data
}

// FuzzSelection: whatever indices compress accepts come back exactly from
// decompress; whatever it refuses is refused with ErrSelection.
func FuzzSelection(f *testing.F) {
	f.Add([]byte{0, 3, 5, 9, 1, 2, 3, 4}, uint16(12))
	f.Add([]byte{4, 4, 0, 1, 2, 3, 7, 6}, uint16(8))
	f.Add([]byte{0, 1, 2, 3, 4, 5, 6, 200}, uint16(200))
	f.Fuzz(func(t *testing.T, raw []byte, ctx uint16) {
		const heads, kept = 2, 4
		if len(raw) < heads*kept {
			return
		}
		src := selectedCache(t, 1, heads, kept, 64, 16, 1)
		idx := make([]int32, heads*kept)
		for i := range idx {
			idx[i] = int32(int8(raw[i]))
		}
		src.Tensors[2].Data = i32Bytes(idx)
		src.Metadata[MetaContextLength] = strconv.Itoa(int(ctx))
		res, err := Compress(src, DefaultConfig())
		if err != nil {
			if !errors.Is(err, ErrSelection) {
				t.Fatalf("refused with %v, want ErrSelection", err)
			}
			return
		}
		got, err := Decompress(asContainer(t, res), 1)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got.Tensors[2].Data, src.Tensors[2].Data) {
			t.Fatalf("indices %v came back as %x", idx, got.Tensors[2].Data)
		}
	})
}
