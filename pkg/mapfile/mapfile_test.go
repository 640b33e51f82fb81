package mapfile

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

func TestOpenRefusesNonRegular(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	linkToDir := filepath.Join(dir, "link-to-dir")
	if err := os.Symlink(dir, linkToDir); err != nil {
		t.Fatal(err)
	}
	tests := []struct{ name, path string }{
		{"directory", dir},
		{"FIFO", fifo},
		{"character device", "/dev/zero"},
		{"symlink to a directory", linkToDir},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := os.Stat(tc.path); err != nil {
				t.Skip(err)
			}
			done := make(chan error, 1)
			go func() {
				f, err := Open(tc.path, true)
				if f != nil {
					f.Close()
				}
				done <- err
			}()
			select {
			case err := <-done:
				if !errors.Is(err, ErrNotRegular) {
					t.Fatalf("Open(%s) = %v, want ErrNotRegular", tc.path, err)
				}
			case <-time.After(5 * time.Second):
				t.Fatalf("Open(%s) blocked", tc.path)
			}
		})
	}
}

func TestReadAt(t *testing.T) {
	dir := t.TempDir()
	content := bytes.Repeat([]byte("0123456789"), 1000)
	path := filepath.Join(dir, "f")
	os.WriteFile(path, content, 0o640)
	link := filepath.Join(dir, "link")
	os.Symlink(path, link)
	empty := filepath.Join(dir, "empty")
	os.WriteFile(empty, nil, 0o644)
	for _, tc := range []struct {
		name, path string
		mmap       bool
		want       []byte
		mapped     bool
	}{
		{"mapped", path, true, content, true},
		{"positioned reads", path, false, content, false},
		{"through a symlink", link, true, content, true},
		{"empty file", empty, true, nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, err := Open(tc.path, tc.mmap)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if f.Mapped() != tc.mapped || f.Size() != int64(len(tc.want)) || f.Mode().Perm() != 0o640 && len(tc.want) > 0 {
				t.Fatalf("mapped %v size %d mode %v", f.Mapped(), f.Size(), f.Mode())
			}
			if tc.mapped && !bytes.Equal(f.Bytes(), tc.want) {
				t.Fatal("Bytes differs from the file")
			}
			got := make([]byte, len(tc.want))
			if n, err := f.ReadAt(got, 0); n != len(got) || (err != nil && err != io.EOF) || !bytes.Equal(got, tc.want) {
				t.Fatalf("ReadAt whole: %d, %v", n, err)
			}
			if len(tc.want) > 0 {
				tail := make([]byte, 20)
				n, err := f.ReadAt(tail, int64(len(tc.want)-10))
				if n != 10 || err != io.EOF || !bytes.Equal(tail[:10], tc.want[len(tc.want)-10:]) {
					t.Fatalf("ReadAt past the end: %d, %v", n, err)
				}
			}
		})
	}
}
