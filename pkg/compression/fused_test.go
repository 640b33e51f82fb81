package compression

import (
	"bytes"
	"errors"
	"math"
	"testing"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// TestNibbleWord checks the 8 codes nibbleWord returns at every nibble
// offset of buffers of several lengths against one code at a time, the
// zero padding past the end included.
func TestNibbleWord(t *testing.T) {
	for _, n := range []int{1, 4, 5, 8, 9, 17, 64} {
		src := make([]byte, n)
		for i := range src {
			src[i] = byte(i*37 + 11)
		}
		for at := 0; at < 2*n; at++ {
			var want uint32
			for k := range 8 {
				if j := at + k; j < 2*n {
					want |= uint32(src[j/2]>>(4*(j%2))&0xf) << (4 * k)
				}
			}
			if got := nibbleWord(src, at); got != want {
				t.Fatalf("len %d, at %d: %08x, want %08x", n, at, got, want)
			}
		}
	}
}

// TestFusedEncoderRefusesNonFinite puts a NaN or an infinity in a value
// tensor (rows) and a key tensor (per-channel groups) of each dtype, where
// the default codec decodes and rotates each row in one pass, and expects
// the scalar path's error.
func TestFusedEncoderRefusesNonFinite(t *testing.T) {
	for _, dt := range []safetensors.DType{safetensors.F16, safetensors.BF16, safetensors.F32} {
		for _, name := range []string{"layer_0_key", "layer_0_value"} {
			for _, v := range []float32{float32(math.NaN()), float32(math.Inf(1))} {
				t.Run(string(dt)+"/"+name+"/"+fmtFloat(float64(v)), func(t *testing.T) {
					vals := make([]float32, 2*16*64)
					for i := range vals {
						vals[i] = float32(i%29)/29 - 0.5
					}
					vals[64*9+17] = v
					data := make([]byte, len(vals)*dt.Bits()/8)
					if err := safetensors.EncodeFloat32(dt, vals, data); err != nil {
						t.Fatal(err)
					}
					f := &safetensors.File{Tensors: []safetensors.Tensor{{Name: name, DType: dt, Shape: []int64{1, 2, 16, 64}, Data: data}}}
					_, _, vecErr, scalarErr := compressBoth(t, f, DefaultConfig())
					if vecErr == nil || scalarErr == nil || vecErr.Error() != scalarErr.Error() || !errors.Is(vecErr, ErrNonFinite) {
						t.Fatalf("vector error %v, scalar error %v: want the same ErrNonFinite", vecErr, scalarErr)
					}
				})
			}
		}
	}
}

// TestDequantizeTensorVector compares the vector dequantizer of the seed's
// scheme with the scalar tables, byte for byte, on scales from float16
// subnormals (tiny outputs, signed zeros) to ones whose codes overflow
// float16 (the vector path then hands over to the scalar one).
func TestDequantizeTensorVector(t *testing.T) {
	if !haveSIMD {
		t.Skip("no vector units in this build")
	}
	scales := []uint16{0x0000, 0x0001, 0x03ff, 0x0400, 0x2e66, 0x3c00, 0x5640, 0x7000, 0x7bfe} // +1 on odd groups stays finite
	for _, dt := range []safetensors.DType{safetensors.F16, safetensors.BF16} {
		for _, g := range []int{32, 64, 128} {
			for si, s16 := range scales {
				for _, n := range []int{512, 704, 64 * 19} { // whole blocks of 8 scales, and a tail
					if n%g != 0 {
						continue
					}
					t.Run(string(dt)+"/G"+itoa(g)+"/scale"+itoa(si)+"/n"+itoa(n), func(t *testing.T) {
						codes := make([]byte, n/2)
						for i := range codes {
							codes[i] = byte(i*73 + 5)
						}
						sc := make([]uint16, n/g)
						for i := range sc {
							sc[i] = s16 + uint16(i%2) // neighbouring groups differ
						}
						got, want := make([]byte, n*2), make([]byte, n*2)
						dequantizeTensor(codes, sc, g, dt, got)
						defer func(old bool) { simdEnabled = old }(simdEnabled)
						simdEnabled = false
						dequantizeTensor(codes, sc, g, dt, want)
						if !bytes.Equal(got, want) {
							t.Fatalf("vector and scalar dequantization differ")
						}
					})
				}
			}
		}
	}
}

// FuzzBitsRowDecoder decodes arbitrary codes, scales and minimums (negative,
// Inf and NaN ones included) of 2, 3 and 4-bit codes of either scheme with
// the vector and the scalar decoders: the restored bytes, or the error, must
// be the same.
func FuzzBitsRowDecoder(f *testing.F) {
	f.Add(uint8(0), uint8(0), []byte{0x12, 0x34, 0x00, 0x3c, 0xff, 0x7b, 0x01, 0x00})
	f.Add(uint8(4), uint8(5), []byte{0x88, 0x77, 0x00, 0x7c, 0x00, 0x3c})
	f.Add(uint8(0x47), uint8(1), []byte{0x01, 0x80, 0x00, 0x04, 0x33, 0xbc})
	dtypes := []safetensors.DType{safetensors.F16, safetensors.BF16, safetensors.F32}
	f.Fuzz(func(t *testing.T, sel, kind uint8, data []byte) {
		dt := dtypes[int(sel)%len(dtypes)]
		p := tensorPlan{Scheme: SchemeSym, Bits: 2 + int(kind)%3, Axis: AxisLast, Rotate: RotateHadamard, Group: 32, Sink: int(sel/3) % 3}
		if kind&4 != 0 {
			p.Scheme = SchemeAsym
		}
		if sel&0x80 != 0 {
			p.Rotate = RotateNone
		}
		dim := 32 << (int(sel/9) % 3)
		seq := 1 + len(data)/(dim/2) + p.Sink
		name := "layer_0_value"
		if sel&0x40 != 0 { // per-channel keys: groups along the sequence
			p.Axis, name = AxisSeq, "layer_0_key"
		}
		e := &Entry{Name: name, DType: string(dt), Shape: []int64{1, int64(seq), int64(dim)}}
		nCodes, nScales, nMins, _ := p.payloadSizes(e.Shape, dt.Bits()/8)
		for int64(len(data)) < nCodes+nScales+nMins { // repeat the data to fill every payload
			data = append(data, data...)
			if len(data) == 0 {
				return
			}
		}
		codes := data[:nCodes]
		scales := data[nCodes : nCodes+nScales]
		mins := data[nCodes+nScales : nCodes+nScales+nMins]
		assertDecodeMatchesScalar(t, e, p, codes, scales, mins, seq, dim, dt)
	})
}
