package safetensors

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// build assembles a file from a literal header and a data buffer of n bytes.
func build(header string, n int) []byte {
	var b bytes.Buffer
	binary.Write(&b, binary.LittleEndian, uint64(len(header)))
	b.WriteString(header)
	b.Write(make([]byte, n))
	return b.Bytes()
}

func TestParseValid(t *testing.T) {
	tests := []struct {
		name    string
		header  string
		dataLen int
		want    []string // tensor names in offset order
		shapes  [][]int64
	}{
		{"empty", `{}`, 0, nil, nil},
		{"empty padded", `{}      `, 0, nil, nil},
		{"metadata only", `{"__metadata__":{"a":"b"}}`, 0, nil, nil},
		{"null metadata", `{"__metadata__":null}`, 0, nil, nil},
		{"scalar", `{"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}`, 4, []string{"s"}, [][]int64{{}}},
		{"zero-sized", `{"z":{"dtype":"F16","shape":[0,3],"data_offsets":[0,0]},"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}`, 2, []string{"z", "a"}, [][]int64{{0, 3}, {2}}},
		{"out of header order", `{"b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]},"a":{"dtype":"I16","shape":[1],"data_offsets":[0,2]}}`, 4, []string{"a", "b"}, [][]int64{{1}, {2}}},
		{"unknown fields ignored", `{"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4],"extra":1}}`, 4, []string{"a"}, [][]int64{{2}}},
		{"sub-byte dtype", `{"a":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}}`, 2, []string{"a"}, [][]int64{{4}}},
		{"whitespace padding", "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}\n  \t", 1, []string{"a"}, [][]int64{{1}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f, err := Parse(build(tc.header, tc.dataLen))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if len(f.Tensors) != len(tc.want) {
				t.Fatalf("got %d tensors, want %d", len(f.Tensors), len(tc.want))
			}
			for i, tn := range f.Tensors {
				if tn.Name != tc.want[i] {
					t.Errorf("tensor %d = %q, want %q", i, tn.Name, tc.want[i])
				}
				if len(tn.Shape) != len(tc.shapes[i]) {
					t.Errorf("tensor %q shape %v, want %v", tn.Name, tn.Shape, tc.shapes[i])
				}
			}
		})
	}
}

func TestParseInvalid(t *testing.T) {
	u8 := func(off string) string { return `{"a":{"dtype":"U8","shape":[2],"data_offsets":` + off + `}}` }
	tests := []struct {
		name    string
		file    []byte
		wantErr error
	}{
		{"too short", []byte{1, 2, 3}, ErrTooShort},
		{"header too large", func() []byte { b := make([]byte, 16); binary.LittleEndian.PutUint64(b, MaxHeaderSize+1); return b }(), ErrHeaderTooLarge},
		{"header past end", func() []byte { b := make([]byte, 16); binary.LittleEndian.PutUint64(b, 9); return b }(), ErrHeaderLength},
		{"huge header length", func() []byte { b := make([]byte, 16); binary.LittleEndian.PutUint64(b, 1<<63); return b }(), ErrHeaderTooLarge},
		{"not utf-8", build("{\"\xff\":1}", 0), ErrHeaderEncoding},
		{"not an object", build(`[1,2]`, 0), ErrHeaderStart},
		{"empty header", build(``, 0), ErrHeaderStart},
		{"not json", build(`{"a":`, 0), ErrHeaderJSON},
		{"garbage after object", build(`{} x`, 0), ErrHeaderJSON},
		{"duplicate name", build(`{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}`, 2), ErrDuplicate},
		{"metadata not strings", build(`{"__metadata__":{"a":1}}`, 0), ErrMetadata},
		{"lower-case dtype", build(`{"a":{"dtype":"f16","shape":[1],"data_offsets":[0,2]}}`, 2), ErrDType},
		{"unknown dtype", build(`{"a":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}`, 16), ErrDType},
		{"missing dtype", build(`{"a":{"shape":[1],"data_offsets":[0,1]}}`, 1), ErrHeaderJSON},
		{"missing shape", build(`{"a":{"dtype":"U8","data_offsets":[0,1]}}`, 1), ErrHeaderJSON},
		{"negative dimension", build(`{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}`, 1), ErrShape},
		{"fractional dimension", build(`{"a":{"dtype":"U8","shape":[1.5],"data_offsets":[0,1]}}`, 1), ErrShape},
		{"exponent dimension", build(`{"a":{"dtype":"U8","shape":[1e0],"data_offsets":[0,1]}}`, 1), ErrShape},
		{"string dimension", build(`{"a":{"dtype":"U8","shape":["1"],"data_offsets":[0,1]}}`, 1), ErrShape},
		{"shape overflow", build(`{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}}`, 0), ErrOverflow},
		{"dimension overflow", build(`{"a":{"dtype":"U8","shape":[99999999999999999999],"data_offsets":[0,0]}}`, 0), ErrShape},
		{"size mismatch", build(u8(`[0,3]`), 3), ErrSizeMismatch},
		{"offsets reversed", build(u8(`[2,0]`), 2), ErrOffsets},
		{"negative offset", build(u8(`[-2,0]`), 2), ErrOffsets},
		{"one offset", build(u8(`[2]`), 2), ErrOffsets},
		{"hole at start", build(u8(`[1,3]`), 3), ErrOverlap},
		{"overlap", build(`{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}`, 3), ErrOverlap},
		{"hole between", build(`{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[3,5]}}`, 5), ErrOverlap},
		{"truncated data", build(u8(`[0,2]`), 1), ErrTruncated},
		{"trailing bytes", build(u8(`[0,2]`), 3), ErrTrailing},
		{"odd sub-byte size", build(`{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}`, 2), ErrSizeMismatch},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse(tc.file)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("Parse error = %v, want %v", err, tc.wantErr)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("error spans several lines: %q", err)
			}
			// ReadHeader must agree with Parse on every header-level problem.
			if _, herr := ReadHeader(bytes.NewReader(tc.file), int64(len(tc.file))); !errors.Is(herr, tc.wantErr) {
				t.Errorf("ReadHeader error = %v, want %v", herr, tc.wantErr)
			}
		})
	}
}

func TestWriteReadRoundTrip(t *testing.T) {
	tensors := []Tensor{
		{Name: "layer_0_key", DType: F16, Shape: []int64{1, 2, 3, 4}, Data: bytes.Repeat([]byte{1, 2}, 24)},
		{Name: "scalar", DType: F32, Shape: []int64{}, Data: []byte{0, 0, 128, 63}},
		{Name: "empty", DType: BF16, Shape: []int64{0, 64}, Data: []byte{}},
		{Name: "ids \"quoted\" ü", DType: I64, Shape: []int64{2}, Data: make([]byte, 16)},
	}
	meta := map[string]string{"format": "pt", "note": "a \"quoted\"\nline"}
	path := filepath.Join(t.TempDir(), "x.safetensors")
	if err := WriteFile(path, tensors, meta); err != nil {
		t.Fatal(err)
	}
	f, err := ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if f.HeaderSize%8 != 0 {
		t.Errorf("header size %d not a multiple of 8", f.HeaderSize)
	}
	if f.Metadata["note"] != meta["note"] || f.Metadata["format"] != "pt" {
		t.Errorf("metadata = %v", f.Metadata)
	}
	for _, want := range tensors {
		got, ok := f.Lookup(want.Name)
		if !ok {
			t.Fatalf("missing %q", want.Name)
		}
		if got.DType != want.DType || !bytes.Equal(got.Data, want.Data) || len(got.Shape) != len(want.Shape) {
			t.Errorf("%q: got %s %v %d bytes", want.Name, got.DType, got.Shape, len(got.Data))
		}
	}
}

func TestWriteRejects(t *testing.T) {
	tests := []struct {
		name    string
		tensors []Tensor
		wantErr error
	}{
		{"size mismatch", []Tensor{{Name: "a", DType: F16, Shape: []int64{3}, Data: make([]byte, 4)}}, ErrSizeMismatch},
		{"duplicate", []Tensor{{Name: "a", DType: U8, Shape: []int64{1}, Data: []byte{1}}, {Name: "a", DType: U8, Shape: []int64{1}, Data: []byte{1}}}, ErrDuplicate},
		{"reserved name", []Tensor{{Name: MetadataKey, DType: U8, Shape: []int64{1}, Data: []byte{1}}}, ErrName},
		{"bad dtype", []Tensor{{Name: "a", DType: "X", Shape: []int64{1}, Data: []byte{1}}}, ErrDType},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "x.safetensors")
			err := WriteFile(path, tc.tensors, nil)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if _, serr := os.Stat(path); !os.IsNotExist(serr) {
				t.Errorf("output exists after failed write")
			}
		})
	}
}

// TestPythonWrittenFiles reads files produced by the Python safetensors
// library (testdata/python/*.safetensors, regenerated by
// tests/gen_python_safetensors.py) and checks them against the JSON manifest written beside them.
func TestPythonWrittenFiles(t *testing.T) {
	paths, _ := filepath.Glob("testdata/python/*.safetensors")
	if len(paths) == 0 {
		t.Skip("no Python-written files in testdata/python")
	}
	for _, p := range paths {
		t.Run(filepath.Base(p), func(t *testing.T) {
			f, err := ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			checkManifest(t, p, f)
		})
	}
}

func FuzzReadHeader(f *testing.F) {
	f.Add(build(`{}`, 0))
	f.Add(build(`{"__metadata__":{"format":"pt"}}`, 0))
	f.Add(build(`{"a":{"dtype":"F16","shape":[2,2],"data_offsets":[0,8]}}`, 8))
	f.Add(build(`{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}`, 4))
	f.Add(build(`{"a":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}}`, 2))
	paths, _ := filepath.Glob("testdata/python/*.safetensors")
	for _, p := range paths {
		if b, err := os.ReadFile(p); err == nil && len(b) < 1<<16 {
			f.Add(b)
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		file, err := Parse(data)
		if err != nil {
			return
		}
		// encoding/json must read the same header: valid JSON, the same
		// names, and each entry's dtype as the fast scanner read it.
		n := binary.LittleEndian.Uint64(data)
		var top map[string]json.RawMessage
		if err := json.Unmarshal(data[8:8+n], &top); err != nil {
			t.Fatalf("encoding/json refuses a header Parse accepted: %v", err)
		}
		for _, tn := range file.Tensors {
			var e map[string]json.RawMessage
			var dt string
			if json.Unmarshal(top[tn.Name], &e) != nil || json.Unmarshal(e["dtype"], &dt) != nil || DType(dt) != tn.DType {
				t.Fatalf("tensor %q: encoding/json reads %s", tn.Name, top[tn.Name])
			}
		}
		want := len(file.Tensors)
		if _, ok := top[MetadataKey]; ok {
			want++
		}
		if len(top) != want {
			t.Fatalf("encoding/json finds %d keys, Parse %d tensors", len(top), len(file.Tensors))
		}
		// A file that parses must re-encode to a file that parses to the same tensors.
		var buf bytes.Buffer
		if err := Encode(&buf, file.Tensors, file.Metadata); err != nil {
			t.Fatalf("re-encode: %v", err)
		}
		again, err := Parse(buf.Bytes())
		if err != nil {
			t.Fatalf("re-parse: %v", err)
		}
		if len(again.Tensors) != len(file.Tensors) {
			t.Fatalf("tensor count %d != %d", len(again.Tensors), len(file.Tensors))
		}
		for i := range file.Tensors {
			if !bytes.Equal(again.Tensors[i].Data, file.Tensors[i].Data) {
				t.Fatalf("tensor %q data differs", file.Tensors[i].Name)
			}
		}
	})
}

func TestFieldNamesAreCaseSensitive(t *testing.T) {
	for _, h := range []string{
		`{"a":{"Dtype":"U8","shape":[1],"data_offsets":[0,1]}}`,
		`{"a":{"dtype":"U8","Shape":[1],"data_offsets":[0,1]}}`,
		`{"a":{"dtype":"U8","shape":[1],"Data_offsets":[0,1]}}`,
	} {
		if _, err := Parse(build(h, 1)); err == nil {
			t.Errorf("accepted %s", h)
		}
	}
}
