package compression

import (
	"bytes"
	"errors"
	"fmt"
	"testing"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// fuzzBudget bounds what the fuzz targets let a container decode to.
const fuzzBudget = 64 << 20

// FuzzDecompressOutputParses: whatever Decompress accepts, the safetensors
// reader accepts its output, with the same tensors. (The audit of issue 13
// found a container that decompressed with exit 0 to a file no reader took:
// a [2^61] U8 tensor whose size wrapped to 0.)
func FuzzDecompressOutputParses(f *testing.F) {
	for i, cfg := range []Config{DefaultConfig(), SeedConfig(), {GroupSize: 32, Scheme: SchemeAsym, Rotate: RotateHadamard, KeyAxis: KeyAxisChannel, Sink: 1, Bits: 3}} {
		src := kvCache(f, 1, 1, 3, 64, safetensors.F16, uint64(i))
		src.Tensors = append(src.Tensors, safetensors.Tensor{Name: "ids", DType: safetensors.I32, Shape: []int64{2}, Data: make([]byte, 8)},
			safetensors.Tensor{Name: "empty", DType: safetensors.F16, Shape: []int64{0, 64}, Data: []byte{}})
		res, err := Compress(src, cfg)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(encodeFile(f, &safetensors.File{Tensors: res.Tensors, Metadata: res.Metadata}))
	}
	wrap := craftContainer(f, []string{storedEntry("x", "U8", "[2305843009213693952]")}, [][]payloadSpec{{{"x.raw", EncodingStored, 0, nil}}})
	f.Add(encodeFile(f, wrap))
	f.Fuzz(func(t *testing.T, data []byte) {
		restored := decompressFuzzInput(t, data)
		if restored == nil {
			return
		}
		var buf bytes.Buffer
		if err := safetensors.Encode(&buf, restored.Tensors, restored.Metadata); err != nil {
			t.Fatalf("restored tensors do not encode: %v", err)
		}
		again, err := safetensors.Parse(buf.Bytes())
		if err != nil {
			t.Fatalf("the reader refuses what Decompress accepted: %v", err)
		}
		if len(again.Tensors) != len(restored.Tensors) {
			t.Fatalf("%d tensors read back, %d restored", len(again.Tensors), len(restored.Tensors))
		}
		for _, want := range restored.Tensors {
			got, ok := again.Lookup(want.Name)
			if !ok || got.DType != want.DType || fmt.Sprint(got.Shape) != fmt.Sprint(want.Shape) || !bytes.Equal(got.Data, want.Data) {
				t.Fatalf("tensor %q differs after reading back", want.Name)
			}
		}
	})
}

// FuzzIndexSizes drives the size arithmetic of a crafted index: one entry of
// any dtype, mode, encoding and shape (dimensions up to 2^63), claiming any
// raw_bytes, backed by a payload of any length, all checksums right. Decoding
// must refuse it or produce exactly the bytes its shape implies, within the
// budget, and never fail inside (a panic or an unset tensor is ErrInternal).
func FuzzIndexSizes(f *testing.F) {
	f.Add(uint8(0), uint8(0), uint8(0), uint64(1)<<50, uint64(1), uint64(1), int64(1)<<50, uint16(1))
	f.Add(uint8(0), uint8(0), uint8(0), uint64(1)<<61, uint64(1), uint64(1), int64(0), uint16(0))
	f.Add(uint8(3), uint8(1), uint8(1), uint64(64), uint64(4), uint64(1), int64(128), uint16(40))
	f.Add(uint8(4), uint8(4), uint8(1), uint64(2), uint64(64), uint64(1), int64(16), uint16(16))
	dtypes := []string{"U8", "I32", "F4", "F16", "F64", "BF16", "F32", "F6_E2M3"}
	modes := []string{"stored", "int4", "int2", "int3", "int8"}
	f.Fuzz(func(t *testing.T, dtSel, modeSel, encSel uint8, d0, d1, d2 uint64, raw int64, plen uint16) {
		dt, mode := dtypes[int(dtSel)%len(dtypes)], modes[int(modeSel)%len(modes)]
		enc := []string{EncodingStored, EncodingLZ4}[encSel%2]
		shape := fmt.Sprintf("[%d,%d,%d]", d0>>1, d1>>1, d2>>1) // non-negative int64s
		payload := make([]byte, plen)
		if enc == EncodingLZ4 && plen > 0 {
			payload = lz4Zeros(t, int(plen)*200)
		}
		var entry string
		var specs []payloadSpec
		if mode == ModeStored {
			entry = storedEntry("x", dt, shape)
			specs = []payloadSpec{{"x.raw", enc, raw, payload}}
		} else {
			entry = `{"name":"x","dtype":"` + dt + `","shape":` + shape + `,"mode":"` + mode + `","codes":%s,"scales":%s}`
			specs = []payloadSpec{{"x.codes", enc, raw, payload}, {"x.scales", enc, raw / 16, payload}}
		}
		file := craftContainer(t, []string{entry}, [][]payloadSpec{specs})
		restored, err := DecompressWithin(file, 1, fuzzBudget)
		if errors.Is(err, ErrInternal) {
			t.Fatalf("internal error: %v", err)
		}
		if err != nil {
			return
		}
		got := restored.Tensors[0]
		n, err := safetensors.NumElements(got.Shape)
		if err != nil {
			t.Fatalf("accepted shape %v: %v", got.Shape, err)
		}
		size, ok := safetensors.ByteSize(n, got.DType)
		if !ok || size != int64(len(got.Data)) || size > fuzzBudget {
			t.Fatalf("accepted %s %v with %d bytes (shape says %d, %v; budget %d)", got.DType, got.Shape, len(got.Data), size, ok, fuzzBudget)
		}
	})
}
