package main

import (
	"bytes"
	"encoding/json"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Inputs that are not regular files exit 3 before a byte is read (a FIFO
// without a writer must not block); outputs that are not regular files
// exit 2 and stay as they were: a symbolic link is neither followed nor
// replaced.
func TestCLINonRegularFiles(t *testing.T) {
	dir := t.TempDir()
	in := filepath.Join(dir, "cache.safetensors")
	copyFile(t, golden+"cache_f16.safetensors", in)
	kvc := filepath.Join(dir, "cache.kvc")
	if code, _, stderr := runCLI(t, "compress", "-i", in, "-o", kvc); code != 0 {
		t.Fatal(stderr)
	}
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(dir, "target")
	os.WriteFile(target, []byte("keep me"), 0o644)
	link := filepath.Join(dir, "link.kvc")
	os.Symlink(target, link)
	tests := []struct {
		name     string
		args     []string
		wantCode int
		stderr   string
		unchange string // a path whose type must not change
	}{
		{"input /dev/zero", []string{"compress", "-i", "/dev/zero", "-o", filepath.Join(dir, "z.kvc")}, 3, "/dev/zero: mapfile: input is not a regular file (it is a character device)", ""},
		{"input FIFO", []string{"decompress", "-i", fifo, "-o", filepath.Join(dir, "f.safetensors")}, 3, "(it is a FIFO)", fifo},
		{"input directory", []string{"inspect", "-i", dir}, 3, "(it is a directory)", ""},
		{"output /dev/null", []string{"compress", "-i", in, "-o", "/dev/null"}, 2, "/dev/null is a character device", "/dev/null"},
		{"output FIFO", []string{"decompress", "-i", kvc, "-o", fifo}, 2, "is a FIFO", fifo},
		{"output symlink", []string{"compress", "-i", in, "-o", link}, 2, "is a symbolic link", link},
		{"output directory", []string{"decompress", "-i", kvc, "-o", dir}, 2, "is a directory", dir},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var before fs.FileMode
			if tc.unchange != "" {
				fi, err := os.Lstat(tc.unchange)
				if err != nil {
					t.Skip(err)
				}
				before = fi.Mode()
			}
			type result struct {
				code   int
				doc    map[string]any
				stderr string
			}
			done := make(chan result, 1)
			go func() { // run, not runCLI: t.Fatal belongs to the test's goroutine
				var out, errb bytes.Buffer
				code := run(tc.args, &out, &errb)
				var doc map[string]any
				json.Unmarshal(out.Bytes(), &doc)
				done <- result{code, doc, errb.String()}
			}()
			var r result
			select {
			case r = <-done:
			case <-time.After(10 * time.Second):
				t.Fatal("kv-compress blocked")
			}
			if r.code != tc.wantCode || !strings.Contains(r.stderr, tc.stderr) {
				t.Fatalf("exit %d, stderr %q; want exit %d and %q", r.code, r.stderr, tc.wantCode, tc.stderr)
			}
			if r.doc["error"] == nil || int(r.doc["exit_code"].(float64)) != tc.wantCode {
				t.Errorf("JSON %v", r.doc)
			}
			if tc.unchange != "" {
				if fi, _ := os.Lstat(tc.unchange); fi.Mode() != before {
					t.Errorf("%s changed from %v to %v", tc.unchange, before, fi.Mode())
				}
			}
			if b, _ := os.ReadFile(target); string(b) != "keep me" {
				t.Errorf("the symbolic link's target was written: %q", b)
			}
			entries, _ := os.ReadDir(dir)
			for _, e := range entries {
				if strings.Contains(e.Name(), ".tmp-") || strings.Contains(e.Name(), ".scratch-") {
					t.Errorf("left behind: %s", e.Name())
				}
			}
		})
	}
}

// --no-sync changes durability only: the same bytes, the same report shape.
func TestCLINoSync(t *testing.T) {
	dir := t.TempDir()
	in := filepath.Join(dir, "cache.safetensors")
	copyFile(t, golden+"cache_f16.safetensors", in)
	out := map[bool][2][]byte{}
	for _, noSync := range []bool{false, true} {
		kvc, back := filepath.Join(dir, "c.kvc"), filepath.Join(dir, "back.safetensors")
		extra := []string{}
		if noSync {
			extra = []string{"--no-sync"}
		}
		if code, _, stderr := runCLI(t, append([]string{"compress", "-i", in, "-o", kvc}, extra...)...); code != 0 {
			t.Fatal(stderr)
		}
		if code, doc, stderr := runCLI(t, append([]string{"decompress", "-i", kvc, "-o", back}, extra...)...); code != 0 || doc["tensors"] == nil {
			t.Fatal(stderr)
		}
		c, _ := os.ReadFile(kvc)
		b, _ := os.ReadFile(back)
		out[noSync] = [2][]byte{c, b}
	}
	if string(out[false][0]) != string(out[true][0]) || string(out[false][1]) != string(out[true][1]) {
		t.Fatal("--no-sync changed the output bytes")
	}
}
