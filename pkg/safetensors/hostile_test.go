package safetensors

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"
)

// TestDuplicateFieldsRefused: a tensor entry naming a field twice is refused,
// as the reference (serde) parser refuses it, rather than the last one winning
// (found by the hostile-input audit of issue 13).
func TestDuplicateFieldsRefused(t *testing.T) {
	tests := []struct {
		name, header string
		dataLen      int
	}{
		{"dtype twice", `{"a":{"dtype":"U8","dtype":"F16","shape":[2],"data_offsets":[0,2]}}`, 2},
		{"shape twice", `{"a":{"dtype":"U8","shape":[4],"shape":[2],"data_offsets":[0,2]}}`, 2},
		{"data_offsets twice", `{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,4],"data_offsets":[0,2]}}`, 2},
		{"metadata twice", `{"__metadata__":{"a":"b"},"__metadata__":{"a":"c"}}`, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse(build(tc.header, tc.dataLen))
			if !errors.Is(err, ErrHeaderJSON) && !errors.Is(err, ErrDuplicate) {
				t.Fatalf("Parse error = %v, want a duplicate-field error", err)
			}
			if !strings.Contains(err.Error(), "twice") && !errors.Is(err, ErrDuplicate) {
				t.Errorf("error does not say what is duplicated: %v", err)
			}
		})
	}
}

// TestEncodeHeaderRefusesWrappingSizes: a shape whose byte size wraps around
// 2^64 (here [2^61] U8, 2^64 bits) must not pass for an empty tensor.
func TestEncodeHeaderRefusesWrappingSizes(t *testing.T) {
	tests := []struct {
		name  string
		dt    DType
		shape []int64
	}{
		{"2^61 U8", U8, []int64{1 << 61}},
		{"2^58 F64", F64, []int64{1 << 58}},
		{"2^31 x 2^31 F32", F32, []int64{1 << 31, 1 << 31}},
		{"2^62 F4", F4, []int64{1 << 62}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := EncodeHeader([]Tensor{{Name: "a", DType: tc.dt, Shape: tc.shape, Data: nil}}, nil)
			if !errors.Is(err, ErrOverflow) && !errors.Is(err, ErrSizeMismatch) {
				t.Fatalf("EncodeHeader accepted shape %v of %s with no data (err %v)", tc.shape, tc.dt, err)
			}
		})
	}
	for _, n := range []int64{1 << 61, 1 << 59} {
		if _, ok := ByteSize(n, F64); ok {
			t.Errorf("ByteSize(%d, F64) claims to fit", n)
		}
	}
	if got, ok := ByteSize(3, F4); ok {
		t.Errorf("ByteSize(3, F4) = %d: half a byte passed as whole", got)
	}
}

// TestLookupManyTensors: a parsed file finds each of many tensors through its
// name index, and a rearranged File still answers correctly.
func TestLookupManyTensors(t *testing.T) {
	const n = 20000
	var hb strings.Builder
	hb.WriteByte('{')
	for i := range n {
		if i > 0 {
			hb.WriteByte(',')
		}
		fmt.Fprintf(&hb, `"t%d":{"dtype":"U8","shape":[1],"data_offsets":[%d,%d]}`, n-1-i, n-1-i, n-i)
	}
	hb.WriteByte('}')
	f, err := Parse(build(hb.String(), n))
	if err != nil {
		t.Fatal(err)
	}
	for i := range n {
		name := fmt.Sprintf("t%d", i)
		got, ok := f.Lookup(name)
		if !ok || got.Name != name || &f.Tensors[i] != got {
			t.Fatalf("Lookup(%q) = %v, %v; want tensor %d (offset order)", name, got, ok, i)
		}
	}
	f.Tensors[0], f.Tensors[1] = f.Tensors[1], f.Tensors[0]
	if got, ok := f.Lookup("t0"); !ok || got.Name != "t0" {
		t.Fatalf("after a swap Lookup(t0) = %v, %v", got, ok)
	}
	if _, ok := f.Lookup("missing"); ok {
		t.Fatal("Lookup found a missing name")
	}
	hand := &File{Tensors: []Tensor{{Name: "x"}}}
	if _, ok := hand.Lookup("x"); !ok {
		t.Fatal("a File built by hand does not find its tensor")
	}
}

// TestMetadataKeysParse: a header of many metadata keys parses into one map
// with every value.
func TestMetadataKeysParse(t *testing.T) {
	var hb bytes.Buffer
	hb.WriteString(`{"__metadata__":{`)
	for i := range 5000 {
		if i > 0 {
			hb.WriteByte(',')
		}
		fmt.Fprintf(&hb, `"k%d":"v%d"`, i, i)
	}
	hb.WriteString(`}}`)
	f, err := Parse(build(hb.String(), 0))
	if err != nil {
		t.Fatal(err)
	}
	if len(f.Metadata) != 5000 || f.Metadata["k4999"] != "v4999" {
		t.Fatalf("metadata has %d keys, k4999 = %q", len(f.Metadata), f.Metadata["k4999"])
	}
}
