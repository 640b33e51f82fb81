package compression

import (
	"bytes"
	"encoding/json"
	"math"
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
		seq := 5
		if cfg.Roles != nil { // long enough for entropy-coded payloads and a key group of its own
			seq = 300
		}
		src := kvCache(f, 1, 2, seq, 64, safetensors.F16, 3)
		src.Tensors = append(src.Tensors, safetensors.Tensor{Name: "ids", DType: safetensors.I32, Shape: []int64{2}, Data: make([]byte, 8)})
		res, err := Compress(src, cfg)
		if err != nil {
			f.Fatal(err)
		}
		return res
	}
	for _, cfg := range []Config{DefaultConfig(), {GroupSize: 32, Scheme: SchemeAsym, Rotate: RotateHadamard, KeyAxis: KeyAxisChannel, Sink: 1, Bits: 3}, presetConfig(PresetCompact)} {
		res := base(cfg)
		f.Add(res.Metadata[MetaCodec], res.Metadata[MetaTensors], 0, res.Tensors[0].Data)
		f.Add(res.Metadata[MetaCodec], res.Metadata[MetaTensors], 1, res.Tensors[1].Data)
	}
	// A token selection: positions bitmaps beside the keys and values (selection.go).
	selected, err := Compress(selectedCache(f, 1, 2, 5, 64, 11, 3), DefaultConfig())
	if err != nil {
		f.Fatal(err)
	}
	codec := selected.Metadata[MetaCodec]
	for len(codec)%4 != 3 { // the body picks template len(codec) % 4: this one
		codec += " "
	}
	f.Add(codec, selected.Metadata[MetaTensors], 4, selected.Tensors[4].Data)
	templates := []*Result{base(DefaultConfig()), base(Config{GroupSize: 32, Scheme: SchemeAsym, Rotate: RotateHadamard, KeyAxis: KeyAxisChannel, Sink: 1, Bits: 3}),
		base(presetConfig(PresetCompact)), selected}
	f.Fuzz(func(t *testing.T, codec, index string, which int, payload []byte) {
		tmpl := templates[len(codec)%len(templates)]
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
		for _, version := range []string{"1", "2"} { // every readable version's rules
			md := map[string]string{MetaFormat: FormatName, MetaFormatVersion: version, MetaCodec: codec, MetaTensors: index}
			md[MetaIndexChecksum] = indexChecksum(codec, index, "")
			file := &safetensors.File{Metadata: md, Tensors: tensors}
			restored, err := Decompress(file, 1)
			if err != nil {
				continue
			}
			var buf bytes.Buffer
			if err := safetensors.Encode(&buf, restored.Tensors, restored.Metadata); err != nil {
				t.Fatalf("version %s: restored tensors do not encode: %v", version, err)
			}
		}
	})
}

// FuzzRoundTrip: whatever Compress accepts, Decompress must read back, with
// the original names, dtypes and shapes, for every scheme, axis, width, rotation
// and sink. (It found that a group of signed zeros could get the scale −0.)
func FuzzRoundTrip(f *testing.F) {
	seed := kvCache(f, 1, 1, 4, 16, safetensors.F32, 5)
	f.Add(uint8(0), uint8(0), seed.Tensors[0].Data)
	f.Add(uint8(7), uint8(3), seed.Tensors[1].Data)
	f.Add(uint8(5), uint8(1), []byte{0, 0, 0, 0x80, 0, 0, 0, 0, 0, 0, 0, 0x80, 0, 0, 0, 0})
	dtypes := []safetensors.DType{safetensors.F32, safetensors.F16, safetensors.BF16}
	configs := []Config{
		DefaultConfig(), {GroupSize: 32}, {GroupSize: 32, Scheme: SchemeAsym},
		{GroupSize: 32, Scheme: SchemeAsym, KeyAxis: KeyAxisChannel, Sink: 1},
		{GroupSize: 32, Scheme: SchemeAsym, Rotate: RotateHadamard, Bits: 3},
		{GroupSize: 32, Bits: 2, Sink: 2}, {GroupSize: 32, KeyBits: 8, ValueBits: 4, Rotate: RotateHadamard},
		{GroupSize: 32, Scheme: SchemeAsym, KeyAxis: KeyAxisChannel, Bits: 8},
		presetConfig(PresetCompact), presetConfig(PresetSeed),
	}
	f.Fuzz(func(t *testing.T, cfgSel, shapeSel uint8, data []byte) {
		cfg := configs[int(cfgSel)%len(configs)]
		dt := dtypes[int(cfgSel/8)%len(dtypes)]
		dim := 32 << (shapeSel % 2) // 32 or 64
		width := dt.Bits() / 8
		rows := len(data) / (dim * width)
		if rows == 0 {
			return
		}
		name := [2]string{"layer_0_key", "layer_0_value"}[shapeSel/2%2]
		src := &safetensors.File{Tensors: []safetensors.Tensor{{Name: name, DType: dt, Shape: []int64{1, int64(rows), int64(dim)}, Data: data[:rows*dim*width]}}}
		res, err := Compress(src, cfg)
		if err != nil {
			return // refusing is fine; writing what cannot be read back is not
		}
		restored, err := Decompress(asContainer(t, res), 1)
		if err != nil {
			t.Fatalf("Compress(%+v) wrote a container Decompress refuses: %v", cfg, err)
		}
		got := restored.Tensors[0]
		if got.Name != name || got.DType != dt || len(got.Data) != rows*dim*width {
			t.Fatalf("restored %s %s %d bytes, want %s %s %d", got.Name, got.DType, len(got.Data), name, dt, rows*dim*width)
		}
		// Finite values must come back finite: a reconstruction past the
		// dtype's range saturates to its largest finite value (format.md,
		// section 3), at float16's limit too.
		in, out := decode(t, &src.Tensors[0]), decode(t, &got)
		for i, v := range out {
			if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
				t.Fatalf("Compress(%+v): finite element %d (%g) restored as %g", cfg, i, in[i], v)
			}
		}
	})
}

// presetConfig is a built-in preset's configuration with 32-element groups,
// which the fuzzed tensors' last dimension (32 or 64) always allows.
func presetConfig(name string) Config {
	p, err := LoadPreset(name)
	if err != nil {
		panic(err)
	}
	p.Config.GroupSize = 32
	return p.Config
}
