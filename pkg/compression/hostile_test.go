package compression

import (
	"errors"
	"fmt"
	"runtime"
	"strings"
	"testing"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
	"github.com/pierrec/lz4/v4"
)

// payloadSpec is one payload tensor of a crafted container and how its index
// description presents it.
type payloadSpec struct {
	name     string
	encoding string
	rawBytes int64
	data     []byte
}

func (p payloadSpec) json() string {
	return fmt.Sprintf(`{"tensor":%q,"encoding":%q,"raw_bytes":%d,"crc32c":%q}`, p.name, p.encoding, p.rawBytes, checksum(p.data))
}

// craftContainer builds a container whose index checksum and payload
// checksums are right, so that only what the entries claim is hostile. Each
// entry is the JSON of an index entry with %s where its payload descriptions go.
func craftContainer(tb testing.TB, entries []string, payloads [][]payloadSpec) *safetensors.File {
	tb.Helper()
	var index []string
	var tensors []safetensors.Tensor
	for i, e := range entries {
		var descs []any
		for _, p := range payloads[i] {
			descs = append(descs, p.json())
			tensors = append(tensors, safetensors.Tensor{Name: p.name, DType: safetensors.U8, Shape: []int64{int64(len(p.data))}, Data: p.data})
		}
		index = append(index, fmt.Sprintf(e, descs...))
	}
	codec := `{"scheme":"sym","bits":4,"key_bits":4,"value_bits":4,"group_size":64,"rotate":"none","key_axis":"token","sink":0,"sparsity":0,"scale_dtype":"F16","rounding":"half_to_even","nibble_order":"low_first","checksum":"crc32c"}`
	tj := "[" + strings.Join(index, ",") + "]"
	md := map[string]string{MetaFormat: FormatName, MetaFormatVersion: "1", MetaCodec: codec, MetaTensors: tj,
		MetaIndexChecksum: indexChecksum(codec, tj, "")}
	f, err := safetensors.Parse(encodeFile(tb, &safetensors.File{Tensors: tensors, Metadata: md}))
	if err != nil {
		tb.Fatal(err)
	}
	return f
}

// lz4Zeros is an LZ4 block that expands to n zero bytes, at LZ4's best ratio.
func lz4Zeros(tb testing.TB, n int) []byte {
	tb.Helper()
	var c lz4.CompressorCCompat
	buf := make([]byte, lz4.CompressBlockBound(n))
	k, err := c.CompressBlock(make([]byte, n), buf)
	if err != nil || k == 0 {
		tb.Fatalf("lz4 of %d zeros: %d, %v", n, k, err)
	}
	return buf[:k]
}

func storedEntry(name, dtype, shape string) string {
	return `{"name":"` + name + `","dtype":"` + dtype + `","shape":` + shape + `,"mode":"stored","raw":%s}`
}

// TestHostileIndexRefused reproduces the hostile-input audit of issue 13: each
// container has valid checksums and lies only in what its index claims. Every
// one must be refused before anything is allocated from the claim (the first
// one panicked with makeslice, 2^34–2^40 ran out of memory, [2^61] U8 wrapped
// to 0 bytes and wrote a file no reader accepts).
func TestHostileIndexRefused(t *testing.T) {
	one := []byte{7}
	type tc struct {
		name     string
		entries  []string
		payloads [][]payloadSpec
		budget   int64
		wantErr  error
	}
	tests := []tc{
		{"stored raw claims [2^61] U8 of 0 bytes", []string{storedEntry("x", "U8", "[2305843009213693952]")},
			[][]payloadSpec{{{"x.raw", EncodingStored, 0, nil}}}, 0, ErrCorrupt},
		{"F4 [2^62]: n·bits wraps", []string{storedEntry("x", "F4", "[4611686018427387904]")},
			[][]payloadSpec{{{"x.raw", EncodingStored, 0, nil}}}, 0, ErrCorrupt},
		{"int4 F64 [2^59]: n·bits wraps", []string{`{"name":"x","dtype":"F64","shape":[576460752303423488],"mode":"int4","codes":%s,"scales":%s}`},
			[][]payloadSpec{{{"x.codes", EncodingStored, 1 << 58, one}, {"x.scales", EncodingStored, 1 << 54, one}}}, 0, ErrCorrupt},
		{"LZ4 raw claims 256x its bytes", []string{storedEntry("x", "U8", "[4096]")},
			[][]payloadSpec{{{"x.raw", EncodingLZ4, 4096, make([]byte, 16)}}}, 0, ErrCorrupt},
		{"stored scales shorter than claimed", []string{`{"name":"x","dtype":"F16","shape":[1,64],"mode":"int4","codes":%s,"scales":%s}`},
			[][]payloadSpec{{{"x.codes", EncodingStored, 32, make([]byte, 32)}, {"x.scales", EncodingStored, 2, one}}}, 0, ErrCorrupt},
	}
	for _, k := range []int{31, 34, 40, 50} { // the 633-byte panic (2^50) and its neighbours
		n := int64(1) << k
		tests = append(tests, tc{fmt.Sprintf("stored 1 byte claims 2^%d", k),
			[]string{storedEntry("x", "U8", fmt.Sprintf("[%d]", n))},
			[][]payloadSpec{{{"x.raw", EncodingStored, n, one}}}, 0, ErrCorrupt})
	}
	// LZ4 bombs: payloads at LZ4's best ratio that are valid but declare more
	// than the budget allows, refused before the output is allocated.
	const bomb = 64 << 20 // bytes of output
	tests = append(tests,
		tc{"LZ4 stored tensor past the budget", []string{storedEntry("x", "U8", fmt.Sprintf("[%d]", bomb))},
			[][]payloadSpec{{{"x.raw", EncodingLZ4, bomb, lz4Zeros(t, bomb)}}}, 16 << 20, ErrTooLarge},
		tc{"2-bit codes to F64 past the budget", []string{`{"name":"x","dtype":"F64","shape":[128,65536],"mode":"int2","codes":%s,"scales":%s}`},
			[][]payloadSpec{{{"x.codes", EncodingLZ4, bomb / 32, lz4Zeros(t, bomb/32)}, {"x.scales", EncodingLZ4, bomb / 256, lz4Zeros(t, bomb/256)}}},
			16 << 20, ErrTooLarge},
	)
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := craftContainer(t, tc.entries, tc.payloads)
			_, err := DecompressWithin(f, 2, tc.budget)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
		})
	}
}

// TestBombWithinBudgetDecodes: the same 2-bit bomb is a valid container (an
// all-zero tensor); with room for it, it decodes to zeros.
func TestBombWithinBudgetDecodes(t *testing.T) {
	const out = 8 << 20
	f := craftContainer(t, []string{`{"name":"x","dtype":"F64","shape":[16,65536],"mode":"int2","codes":%s,"scales":%s}`},
		[][]payloadSpec{{{"x.codes", EncodingLZ4, out / 32, lz4Zeros(t, out/32)}, {"x.scales", EncodingLZ4, out / 256, lz4Zeros(t, out/256)}}})
	r, err := DecompressWithin(f, 1, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	if got := r.Tensors[0].Data; len(got) != out || strings.Trim(string(got), "\x00") != "" {
		t.Fatalf("restored %d bytes, want %d zero bytes", len(got), out)
	}
}

// TestParallelRecoversPanics: a panicking worker becomes an error naming an
// internal failure; the caller never sees success with a tensor left undone.
func TestParallelRecoversPanics(t *testing.T) {
	for _, workers := range []int{1, 4} {
		err := parallel(10, workers, func(_, i int) error {
			if i == 3 {
				var s []byte
				_ = s[i] // index out of range
			}
			return nil
		})
		if !errors.Is(err, ErrInternal) {
			t.Fatalf("workers=%d: err = %v, want ErrInternal", workers, err)
		}
	}
}

func TestCapWorkers(t *testing.T) {
	procs := runtime.GOMAXPROCS(0)
	for _, tc := range []struct{ in, want int }{{0, procs}, {1, 1}, {100000, MaxWorkersPerCPU * procs}} {
		if got := capWorkers(tc.in); got != tc.want {
			t.Errorf("capWorkers(%d) = %d, want %d", tc.in, got, tc.want)
		}
	}
}

func TestParseSize(t *testing.T) {
	tests := []struct {
		in   string
		want int64
	}{
		{"2GiB", 2 << 30}, {"1.5G", 3 << 29}, {"500MB", 500e6}, {"1073741824", 1 << 30}, {"64 MiB", 64 << 20},
		{"10kB", 10000}, {"3B", 3}, {"0", -1}, {"-1G", -1}, {"lots", -1}, {"1e30", -1}, {"NaN", -1}, {"", -1}, {"0.1B", -1},
	}
	for _, tc := range tests {
		got, err := ParseSize(tc.in)
		if tc.want < 0 {
			if err == nil || !errors.Is(err, ErrConfig) {
				t.Errorf("ParseSize(%q) = %d, %v; want an ErrConfig error", tc.in, got, err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
		}
	}
}

func TestDefaultMaxMemory(t *testing.T) {
	m := DefaultMaxMemory()
	if m < 64<<20 {
		t.Fatalf("DefaultMaxMemory() = %d, below the 64 MiB floor", m)
	}
	if total, ok := memTotal(); ok && m > total {
		t.Fatalf("DefaultMaxMemory() = %d, more than MemTotal %d", m, total)
	}
}

// TestCompressBudget: compress fits its workers to the budget and refuses a
// tensor whose buffers alone exceed it, before encoding.
func TestCompressBudget(t *testing.T) {
	src := kvCache(t, 1, 1, 64, 64, safetensors.F16, 3) // 2 tensors of 4096 elements
	if _, err := Compress(src, Config{GroupSize: 64, MaxMemory: 64 << 10}); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("64 KiB budget: err = %v, want ErrTooLarge", err)
	}
	if _, err := Compress(src, Config{GroupSize: 64, MaxMemory: 1 << 20, Workers: 64}); err != nil {
		t.Fatalf("1 MiB budget: %v", err)
	}
}

// TestManyTensorsHeaderRefused: so many tensors that the container's header
// would pass safetensors' 100 MB limit are refused before encoding.
func TestManyTensorsHeaderRefused(t *testing.T) {
	src := &safetensors.File{Tensors: make([]safetensors.Tensor, safetensors.MaxHeaderSize/containerEntryBytes+1)}
	for i := range src.Tensors {
		src.Tensors[i] = safetensors.Tensor{Name: "t", DType: safetensors.U8, Shape: []int64{0}}
	}
	if _, err := Compress(src, SeedConfig()); !errors.Is(err, safetensors.ErrHeaderTooLarge) {
		t.Fatalf("err = %v, want ErrHeaderTooLarge", err)
	}
}

// TestManyMetadataKeysRefused: metadata that the container's header could not
// hold is refused before encoding, not after.
func TestManyMetadataKeysRefused(t *testing.T) {
	src := &safetensors.File{Metadata: make(map[string]string)}
	for i := range safetensors.MaxHeaderSize / 20 {
		src.Metadata[fmt.Sprintf("%012x", i)] = "v"
	}
	if _, err := compressBudget(src, SeedConfig()); !errors.Is(err, safetensors.ErrHeaderTooLarge) {
		t.Fatalf("err = %v, want ErrHeaderTooLarge", err)
	}
}
