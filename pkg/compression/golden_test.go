package compression

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"flag"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// The golden vectors in testdata/golden are the contract between the Go codec
// and the Python reference (tests/test_golden.py reads the same files): small
// safetensors inputs, and for each codec configuration the expected float16
// scales, packed codes and the SHA-256 of the reconstruction. Regenerate with
// `go test ./pkg/compression -run TestGolden -update` only when the format
// deliberately changes, and bump FormatVersion when it does.
var update = flag.Bool("update", false, "rewrite the golden files in testdata/golden")

const goldenDir = "testdata/golden"

// GoldenCase is one compression of one input file.
type GoldenCase struct {
	Input     string  `json:"input"`
	GroupSize int     `json:"group_size"`
	Sparsity  float64 `json:"sparsity"`
	// Codec options beyond version 1's; empty or zero means the default.
	Scheme    string `json:"scheme,omitempty"`
	Rotate    string `json:"rotate,omitempty"`
	KeyAxis   string `json:"key_axis,omitempty"`
	Sink      int    `json:"sink,omitempty"`
	Bits      int    `json:"bits,omitempty"`
	KeyBits   int    `json:"key_bits,omitempty"`
	ValueBits int    `json:"value_bits,omitempty"`
	// Roles are per-role, per-layer plans (golden_v2.json only).
	Roles   *RolePlans              `json:"roles,omitempty"`
	Tensors map[string]GoldenTensor `json:"tensors"`
}

func (gc GoldenCase) config() Config {
	return Config{GroupSize: gc.GroupSize, Sparsity: gc.Sparsity, Scheme: gc.Scheme, Rotate: gc.Rotate, KeyAxis: gc.KeyAxis,
		Sink: gc.Sink, Bits: gc.Bits, KeyBits: gc.KeyBits, ValueBits: gc.ValueBits, Roles: gc.Roles}
}

// GoldenTensor holds the expected encoding of one tensor.
type GoldenTensor struct {
	Mode   string `json:"mode"`
	Scheme string `json:"scheme,omitempty"`
	Axis   string `json:"axis,omitempty"`
	Rotate string `json:"rotate,omitempty"`
	Sink   int    `json:"sink,omitempty"`
	// GroupSize is the tensor's own group size when a role plan changed it.
	GroupSize int `json:"group_size,omitempty"`
	// Mins (asym) and SinkRows (exact leading positions) are hex like Scales.
	Mins     string `json:"mins,omitempty"`
	SinkRows string `json:"sink_rows,omitempty"`
	// Scales are the float16 scales as little-endian bytes, hex; Codes the packed nibbles, hex.
	Scales string `json:"scales,omitempty"`
	Codes  string `json:"codes,omitempty"`
	// ReconstructionSHA256 hashes the decompressed tensor's bytes.
	ReconstructionSHA256 string `json:"reconstruction_sha256"`
}

// goldenInputs builds the input files: hand-made ties and edge cases, plus
// small random caches in each float dtype.
func goldenInputs() map[string]*safetensors.File {
	tensor := func(name string, dt safetensors.DType, shape []int64, vals []float32) safetensors.Tensor {
		data := make([]byte, len(vals)*dt.Bits()/8)
		safetensors.EncodeFloat32(dt, vals, data)
		return safetensors.Tensor{Name: name, DType: dt, Shape: shape, Data: data}
	}
	// Row 0: max 7 so the scale is 1 and every half-integer is an exact tie.
	ties := make([]float32, 128)
	for i := range 64 {
		ties[i] = float32(i%13-6) + []float32{0, 0.5, -0.5, 0.25}[i%4]
	}
	ties[0] = 7
	// Row 1: a zero group, then a group of tiny values whose scale is subnormal in float16.
	for i := 96; i < 128; i++ {
		ties[i] = float32(i-112) * 1e-6
	}
	rng := rand.New(rand.NewPCG(2024, 7))
	randn := func(n int, outlier bool) []float32 {
		v := make([]float32, n)
		for i := range v {
			v[i] = float32(rng.NormFloat64())
			if outlier && i%64 == 3 {
				v[i] *= 12
			}
		}
		return v
	}
	cache := func(dt safetensors.DType, dim int) *safetensors.File {
		f := &safetensors.File{}
		for l := range 2 {
			f.Tensors = append(f.Tensors,
				tensor(layerName(l, "key"), dt, []int64{1, 2, 3, int64(dim)}, randn(6*dim, true)),
				tensor(layerName(l, "value"), dt, []int64{1, 2, 3, int64(dim)}, randn(6*dim, false)))
		}
		return f
	}
	return map[string]*safetensors.File{
		"ties_f32.safetensors":   {Tensors: []safetensors.Tensor{tensor("ties", safetensors.F32, []int64{2, 64}, ties)}},
		"cache_f16.safetensors":  cache(safetensors.F16, 128),
		"cache_bf16.safetensors": cache(safetensors.BF16, 64),
		"cache_f32.safetensors":  cache(safetensors.F32, 64),
		"long_f16.safetensors": {Tensors: []safetensors.Tensor{
			tensor("layer_0_key", safetensors.F16, []int64{1, 2, 40, 64}, randn(2*40*64, true)),
			tensor("layer_0_value", safetensors.F16, []int64{1, 2, 40, 64}, randn(2*40*64, false)),
		}},
		"mixed.safetensors": {Tensors: []safetensors.Tensor{
			tensor("f64", safetensors.F64, []int64{2, 32}, randn(64, false)),
			{Name: "ids", DType: safetensors.I64, Shape: []int64{2}, Data: []byte{7, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0}},
		}},
	}
}

// goldenConfigs lists which configurations each input is compressed with.
func goldenConfigs() []GoldenCase {
	return []GoldenCase{
		{Input: "ties_f32.safetensors", GroupSize: 32},
		{Input: "ties_f32.safetensors", GroupSize: 64},
		{Input: "cache_f16.safetensors", GroupSize: 32},
		{Input: "cache_f16.safetensors", GroupSize: 64},
		{Input: "cache_f16.safetensors", GroupSize: 128},
		{Input: "cache_f16.safetensors", GroupSize: 64, Sparsity: 0.5},
		{Input: "cache_bf16.safetensors", GroupSize: 64},
		{Input: "cache_f32.safetensors", GroupSize: 32},
		{Input: "cache_f32.safetensors", GroupSize: 64, Sparsity: 0.25},
		{Input: "mixed.safetensors", GroupSize: 32},
		{Input: "cache_f16.safetensors", GroupSize: 64, Rotate: RotateHadamard},
		{Input: "cache_f16.safetensors", GroupSize: 128, Rotate: RotateHadamard},
		{Input: "cache_bf16.safetensors", GroupSize: 32, Scheme: SchemeAsym},
		{Input: "cache_f32.safetensors", GroupSize: 64, Scheme: SchemeAsym, Rotate: RotateHadamard, Sink: 1},
		{Input: "long_f16.safetensors", GroupSize: 32, Scheme: SchemeAsym, KeyAxis: KeyAxisChannel, Sink: 1},
		{Input: "long_f16.safetensors", GroupSize: 64, Rotate: RotateHadamard, KeyAxis: KeyAxisChannel, Scheme: SchemeAsym, Sink: 1},
		{Input: "long_f16.safetensors", GroupSize: 32, Bits: 2},
		{Input: "long_f16.safetensors", GroupSize: 64, Bits: 3, Scheme: SchemeAsym},
		{Input: "long_f16.safetensors", GroupSize: 64, KeyBits: 8, ValueBits: 4, Rotate: RotateHadamard},
		{Input: "mixed.safetensors", GroupSize: 32, Bits: 8, Sink: 1},
	}
}

// goldenConfigsV2 lists format 2's per-role, per-layer plans: keys and
// values with schemes, widths, rotations, axes, sinks and group sizes of
// their own (per-channel key groups longer than 128 included).
func goldenConfigsV2() []GoldenCase {
	two, zero := 2, 0
	return []GoldenCase{
		{Input: "long_f16.safetensors", GroupSize: 64, Rotate: RotateHadamard, KeyAxis: KeyAxisChannel, Sink: 1,
			Roles: &RolePlans{Keys: &RolePlan{Scheme: SchemeAsym, Rotate: RotateNone, Axis: KeyAxisChannel, GroupSize: 128}}},
		{Input: "long_f16.safetensors", GroupSize: 64, Bits: 3, Rotate: RotateHadamard, Sink: 1,
			Roles: &RolePlans{Keys: &RolePlan{Scheme: SchemeAsym, Rotate: RotateNone, Axis: KeyAxisChannel, GroupSize: 256}, Values: &RolePlan{GroupSize: 32, Sink: &two}}},
		{Input: "long_f16.safetensors", GroupSize: 32,
			Roles: &RolePlans{Values: &RolePlan{Scheme: SchemeAsym, Bits: 2, Axis: KeyAxisChannel, GroupSize: 32, Sink: &zero}}},
		{Input: "cache_bf16.safetensors", GroupSize: 64, Rotate: RotateHadamard,
			Roles: &RolePlans{Layers: []LayerPlan{{Layers: []int{1}, Keys: &RolePlan{Bits: 8, Rotate: RotateNone}, Values: &RolePlan{Scheme: SchemeAsym, Bits: 3, GroupSize: 32}}}}},
	}
}

// encodeGolden compresses and decompresses src and records the encoding.
func encodeGolden(t *testing.T, src *safetensors.File, gc GoldenCase) map[string]GoldenTensor {
	t.Helper()
	res, err := Compress(src, gc.config())
	if err != nil {
		t.Fatal(err)
	}
	container := &safetensors.File{Tensors: res.Tensors, Metadata: res.Metadata}
	restored, err := Decompress(container, 1)
	if err != nil {
		t.Fatal(err)
	}
	idx, err := ReadIndex(container)
	if err != nil {
		t.Fatal(err)
	}
	out := make(map[string]GoldenTensor)
	for i, e := range idx.Entries {
		sum := sha256.Sum256(restored.Tensors[i].Data)
		gt := GoldenTensor{Mode: e.Mode, ReconstructionSHA256: hex.EncodeToString(sum[:])}
		if e.Mode != ModeStored {
			raw := func(p *Payload) string {
				if p == nil {
					return ""
				}
				b := make([]byte, p.RawBytes)
				if err := readPayload(memorySource(container), p, b, nil); err != nil {
					t.Fatal(err)
				}
				return hex.EncodeToString(b)
			}
			plan := e.plan(gc.GroupSize)
			gt.Scheme, gt.Axis, gt.Rotate, gt.Sink, gt.GroupSize = plan.Scheme, plan.Axis, plan.Rotate, plan.Sink, e.GroupSize
			gt.Codes, gt.Scales, gt.Mins, gt.SinkRows = raw(e.Codes), raw(e.Scales), raw(e.Mins), raw(e.SinkP)
		}
		out[e.Name] = gt
	}
	return out
}

// goldenManifests are the golden vector files, with the format version that
// introduced their options and the configurations -update writes into them.
var goldenManifests = []struct {
	file    string
	version int
	configs func() []GoldenCase
}{
	{"golden.json", 1, goldenConfigs},
	{"golden_v2.json", 2, goldenConfigsV2},
	{"golden_nf.json", 2, goldenConfigsNF},
}

func TestGolden(t *testing.T) {
	for _, m := range goldenManifests {
		t.Run(m.file, func(t *testing.T) { testGoldenManifest(t, m.file, m.version, m.configs) })
	}
}

func testGoldenManifest(t *testing.T, file string, version int, configs func() []GoldenCase) {
	inputs := goldenInputs()
	manifest := filepath.Join(goldenDir, file)
	if *update {
		os.MkdirAll(goldenDir, 0o755)
		var cases []GoldenCase
		for name, f := range inputs {
			if err := safetensors.WriteFile(filepath.Join(goldenDir, name), f.Tensors, f.Metadata); err != nil {
				t.Fatal(err)
			}
		}
		for _, gc := range configs() {
			gc.Tensors = encodeGolden(t, inputs[gc.Input], gc)
			cases = append(cases, gc)
		}
		b, _ := json.MarshalIndent(map[string]any{"format_version": version, "cases": cases}, "", " ")
		if err := os.WriteFile(manifest, append(b, '\n'), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	raw, err := os.ReadFile(manifest)
	if err != nil {
		t.Fatalf("%v (run with -update to create the golden files)", err)
	}
	var doc struct {
		FormatVersion int          `json:"format_version"`
		Cases         []GoldenCase `json:"cases"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	// The vectors pin the quantization, which format 2 left unchanged: they
	// were written for version 1 and every readable version must reproduce them.
	if !slices.Contains(ReadableVersions, doc.FormatVersion) {
		t.Fatalf("golden files are for format %d, this build reads %v", doc.FormatVersion, ReadableVersions)
	}
	for i, gc := range doc.Cases {
		name := gc.Input + "/" + codecName(gc.config()) + "/s" + strconvF(gc.Sparsity)
		if gc.Roles != nil {
			name += "/plans" + itoa(i)
		}
		t.Run(name, func(t *testing.T) {
			src, err := safetensors.ReadFile(filepath.Join(goldenDir, gc.Input))
			if err != nil {
				t.Fatal(err)
			}
			got := encodeGolden(t, src, gc)
			if len(got) != len(gc.Tensors) {
				t.Fatalf("%d tensors, golden has %d", len(got), len(gc.Tensors))
			}
			for name, want := range gc.Tensors {
				if got[name] != want {
					t.Errorf("tensor %q differs from the golden encoding", name)
				}
			}
		})
	}
}

// TestGoldenTiesFollowTheRules decodes the hand-made tie row and checks each
// code against the written rule (round half to even), independently of the encoder.
func TestGoldenTiesFollowTheRules(t *testing.T) {
	src := goldenInputs()["ties_f32.safetensors"]
	x := decode(t, &src.Tensors[0])
	got := encodeGolden(t, src, GoldenCase{GroupSize: 64})["ties"]
	codes, _ := hex.DecodeString(got.Codes)
	scales, _ := hex.DecodeString(got.Scales)
	if s := safetensors.F16ToF32(binary.LittleEndian.Uint16(scales)); s != 1 {
		t.Fatalf("first scale %v, want 1", s)
	}
	for i := range 64 {
		nib := codes[i/2] >> (4 * (i % 2)) & 0xf
		want := math.RoundToEven(float64(x[i]))
		if got := float64(int8(nib<<4) >> 4); got != want {
			t.Errorf("element %d = %v: code %v, want %v", i, x[i], got, want)
		}
	}
	if s := binary.LittleEndian.Uint16(scales[2:]); s == 0 {
		t.Error("second row's scale is zero although it holds tiny non-zero values")
	}
}

func strconvF(v float64) string {
	b, _ := json.Marshal(v)
	return string(b)
}
