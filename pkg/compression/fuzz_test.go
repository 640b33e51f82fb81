package compression

import (
	"bytes"
	"encoding/json"
	"testing"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// FuzzDecompressIndex explores the decoder past its checksums: the fuzzer
// edits the codec and tensor index and the bytes of one payload, and the body
// repairs every checksum, so index validation, LZ4 decoding and dequantization
// all see hostile input. Decompress must return an error or a consistent file,
// never panic or allocate beyond what the payloads can justify.
func FuzzDecompressIndex(f *testing.F) {
	base := func(cfg Config) *Result {
		src := kvCache(f, 1, 2, 5, 64, safetensors.F16, 3)
		src.Tensors = append(src.Tensors, safetensors.Tensor{Name: "ids", DType: safetensors.I32, Shape: []int64{2}, Data: make([]byte, 8)})
		res, err := Compress(src, cfg)
		if err != nil {
			f.Fatal(err)
		}
		return res
	}
	for _, cfg := range []Config{DefaultConfig(), {GroupSize: 32, Scheme: SchemeAsym, Rotate: RotateHadamard, KeyAxis: KeyAxisChannel, Sink: 1, Bits: 3}} {
		res := base(cfg)
		f.Add(res.Metadata[MetaCodec], res.Metadata[MetaTensors], 0, res.Tensors[0].Data)
		f.Add(res.Metadata[MetaCodec], res.Metadata[MetaTensors], 1, res.Tensors[1].Data)
	}
	templates := []*Result{base(DefaultConfig()), base(Config{GroupSize: 32, Scheme: SchemeAsym, Rotate: RotateHadamard, KeyAxis: KeyAxisChannel, Sink: 1, Bits: 3})}
	f.Fuzz(func(t *testing.T, codec, index string, which int, payload []byte) {
		tmpl := templates[0]
		if len(codec)%2 == 1 {
			tmpl = templates[1]
		}
		tensors := append([]safetensors.Tensor(nil), tmpl.Tensors...)
		if which < 0 {
			which = -which
		}
		k := which % len(tensors)
		tensors[k] = safetensors.Tensor{Name: tensors[k].Name, DType: safetensors.U8, Shape: []int64{int64(len(payload))}, Data: payload}
		// Repair the payload checksums the index declares, so decoding proceeds.
		var entries []Entry
		if json.Unmarshal([]byte(index), &entries) == nil {
			byName := make(map[string][]byte)
			for _, tn := range tensors {
				byName[tn.Name] = tn.Data
			}
			for i := range entries {
				for _, p := range []*Payload{entries[i].Codes, entries[i].Scales, entries[i].Mins, entries[i].SinkP, entries[i].Raw} {
					if p != nil {
						if d, ok := byName[p.Tensor]; ok {
							p.CRC32C = checksum(d)
						}
					}
				}
			}
			if b, err := json.Marshal(entries); err == nil {
				index = string(b)
			}
		}
		md := map[string]string{MetaFormat: FormatName, MetaFormatVersion: "1", MetaCodec: codec, MetaTensors: index}
		md[MetaIndexChecksum] = indexChecksum(codec, index, "")
		file := &safetensors.File{Metadata: md, Tensors: tensors}
		restored, err := Decompress(file, 1)
		if err != nil {
			return
		}
		var buf bytes.Buffer
		if err := safetensors.Encode(&buf, restored.Tensors, restored.Metadata); err != nil {
			t.Fatalf("restored tensors do not encode: %v", err)
		}
	})
}
