package main

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// writeCache writes a synthetic float16 KV cache shaped like TinyLlama's:
// 22 layers × (key, value) tensors of shape [1, 4, tokens, 64], Gaussian
// values with two outlier channels per key head, as real caches have. It is
// written tensor by tensor, so a cache larger than memory can be made.
// 4,096 tokens give 92.3 MB; 30,720 tokens 692 MB.
func writeCache(path string, tokens int) (int64, error) {
	const layers, heads, dim = 22, 4, 64
	var layout []safetensors.Tensor
	for l := range layers {
		for _, kind := range []string{"key", "value"} {
			layout = append(layout, safetensors.Tensor{Name: fmt.Sprintf("layer_%d_%s", l, kind),
				DType: safetensors.F16, Shape: []int64{1, heads, int64(tokens), dim}})
		}
	}
	hdr, dataLen, err := safetensors.LayoutHeader(layout, map[string]string{"model_name": "synthetic-tinyllama"})
	if err != nil {
		return 0, err
	}
	f, err := os.Create(path)
	if err != nil {
		return 0, err
	}
	w := bufio.NewWriterSize(f, 1<<20)
	binary.Write(w, binary.LittleEndian, uint64(len(hdr)))
	w.Write(hdr)
	rng := rand.New(rand.NewPCG(13, 2026))
	var b [2]byte
	for _, t := range layout {
		key := t.Name[len(t.Name)-3:] == "key"
		for i := range t.ByteLen() / 2 {
			v := rng.NormFloat64()
			if key && i%dim < 2 {
				v *= 8
			}
			binary.LittleEndian.PutUint16(b[:], safetensors.F32ToF16(float32(v)))
			w.Write(b[:])
		}
	}
	if err := w.Flush(); err != nil {
		f.Close()
		return 0, err
	}
	if err := f.Close(); err != nil {
		return 0, err
	}
	return 8 + int64(len(hdr)) + dataLen, nil
}
