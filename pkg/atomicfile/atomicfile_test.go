package atomicfile

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
)

func TestWrite(t *testing.T) {
	boom := errors.New("boom")
	tests := []struct {
		name    string
		before  string // existing content, "" for none
		fn      func(io.Writer) error
		wantErr error
		want    string
	}{
		{"new file", "", func(w io.Writer) error { _, err := io.WriteString(w, "hello"); return err }, nil, "hello"},
		{"replace", "old", func(w io.Writer) error { _, err := io.WriteString(w, "new"); return err }, nil, "new"},
		{"failure keeps old", "old", func(w io.Writer) error { io.WriteString(w, "partial"); return boom }, boom, "old"},
		{"failure leaves nothing", "", func(w io.Writer) error { return boom }, boom, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "out.bin")
			if tc.before != "" {
				if err := os.WriteFile(path, []byte(tc.before), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			err := Write(path, tc.fn)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			got, rerr := os.ReadFile(path)
			if tc.want == "" {
				if !os.IsNotExist(rerr) {
					t.Fatalf("file exists after failure: %q", got)
				}
			} else if string(got) != tc.want {
				t.Fatalf("content = %q, want %q", got, tc.want)
			}
			entries, _ := os.ReadDir(dir)
			for _, e := range entries {
				if e.Name() != "out.bin" {
					t.Errorf("left behind: %s", e.Name())
				}
			}
		})
	}
}

func TestCheckDistinct(t *testing.T) {
	dir := t.TempDir()
	a := filepath.Join(dir, "a")
	os.WriteFile(a, []byte("x"), 0o644)
	link := filepath.Join(dir, "link")
	if err := os.Symlink(a, link); err != nil {
		t.Skip(err)
	}
	tests := []struct {
		name    string
		in, out string
		same    bool
	}{
		{"same path", a, a, true},
		{"relative vs absolute", a, filepath.Join(dir, ".", "a"), true},
		{"symlink", a, link, true},
		{"different", a, filepath.Join(dir, "b"), false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := CheckDistinct(tc.in, tc.out)
			if got := errors.Is(err, ErrSamePath); got != tc.same {
				t.Fatalf("CheckDistinct(%q, %q) = %v, want same=%v", tc.in, tc.out, err, tc.same)
			}
		})
	}
}
