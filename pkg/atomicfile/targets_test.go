package atomicfile

import (
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// lstatMode returns the mode of path without following a symbolic link.
func lstatMode(t *testing.T, path string) fs.FileMode {
	t.Helper()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Mode()
}

// onlyEntries fails when dir holds anything but names (no temporary files).
func onlyEntries(t *testing.T, dir string, names ...string) {
	t.Helper()
	entries, _ := os.ReadDir(dir)
	want := map[string]bool{}
	for _, n := range names {
		want[n] = true
	}
	for _, e := range entries {
		if !want[e.Name()] {
			t.Errorf("left behind in %s: %s", dir, e.Name())
		}
	}
}

func TestCreateRefusesNonRegularTargets(t *testing.T) {
	tests := []struct {
		name  string
		make  func(t *testing.T, dir string) string // returns the target path
		files []string                              // what dir must hold afterwards
	}{
		{"symlink to a regular file", func(t *testing.T, dir string) string {
			os.WriteFile(filepath.Join(dir, "real"), []byte("keep"), 0o644)
			p := filepath.Join(dir, "out")
			if err := os.Symlink("real", p); err != nil {
				t.Skip(err)
			}
			return p
		}, []string{"real", "out"}},
		{"dangling symlink", func(t *testing.T, dir string) string {
			p := filepath.Join(dir, "out")
			if err := os.Symlink(filepath.Join(dir, "nowhere"), p); err != nil {
				t.Skip(err)
			}
			return p
		}, []string{"out"}},
		{"directory", func(t *testing.T, dir string) string {
			p := filepath.Join(dir, "out")
			os.Mkdir(p, 0o755)
			return p
		}, []string{"out"}},
		{"FIFO", func(t *testing.T, dir string) string {
			p := filepath.Join(dir, "out")
			if err := syscall.Mkfifo(p, 0o644); err != nil {
				t.Skip(err)
			}
			return p
		}, []string{"out"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			p := tc.make(t, dir)
			before := lstatMode(t, p)
			f, err := Create(p, Options{})
			if !errors.Is(err, ErrNotRegular) {
				if f != nil {
					f.Abort()
				}
				t.Fatalf("Create(%s) = %v, want ErrNotRegular", tc.name, err)
			}
			if after := lstatMode(t, p); after != before {
				t.Errorf("target mode changed from %v to %v", before, after)
			}
			onlyEntries(t, dir, tc.files...)
			if tc.name == "symlink to a regular file" {
				if b, _ := os.ReadFile(filepath.Join(dir, "real")); string(b) != "keep" {
					t.Errorf("the link's target changed: %q", b)
				}
			}
		})
	}
}

func TestCreateRefusesDevice(t *testing.T) {
	// /dev/null is a character device on every Linux system; as root a
	// rename over it would replace it for the whole machine.
	before, err := os.Lstat("/dev/null")
	if err != nil || before.Mode()&fs.ModeCharDevice == 0 {
		t.Skip("no /dev/null character device")
	}
	if _, err := Create("/dev/null", Options{}); !errors.Is(err, ErrNotRegular) {
		t.Fatalf("Create(/dev/null) = %v, want ErrNotRegular", err)
	}
	if after, _ := os.Lstat("/dev/null"); after.Mode() != before.Mode() {
		t.Fatalf("/dev/null changed: %v", after.Mode())
	}
}

func TestCommitRechecksTarget(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "out")
	f, err := Create(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	f.Write([]byte("data"))
	// Someone plants a symbolic link at the target while we write.
	if err := os.Symlink(filepath.Join(dir, "elsewhere"), p); err != nil {
		t.Skip(err)
	}
	if err := f.Commit(); !errors.Is(err, ErrNotRegular) {
		t.Fatalf("Commit = %v, want ErrNotRegular", err)
	}
	if lstatMode(t, p)&fs.ModeSymlink == 0 {
		t.Fatal("the symbolic link was replaced")
	}
	onlyEntries(t, dir, "out")
}

func TestWriteAtCommitAbort(t *testing.T) {
	for _, tc := range []struct {
		name   string
		noSync bool
		commit bool
	}{
		{"commit", false, true},
		{"commit without sync", true, true},
		{"abort", false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "out")
			f, err := Create(p, Options{NoSync: tc.noSync})
			if err != nil {
				t.Fatal(err)
			}
			defer f.Abort()
			// Out of order, as parallel workers write.
			if _, err := f.WriteAt([]byte("world"), 6); err != nil {
				t.Fatal(err)
			}
			if _, err := f.WriteAt([]byte("hello "), 0); err != nil {
				t.Fatal(err)
			}
			if !tc.commit {
				f.Abort()
				onlyEntries(t, dir)
				return
			}
			if err := f.Commit(); err != nil {
				t.Fatal(err)
			}
			if err := f.Commit(); err == nil {
				t.Error("a second Commit succeeded")
			}
			f.Abort() // no effect after Commit
			if b, _ := os.ReadFile(p); string(b) != "hello world" {
				t.Fatalf("content %q", b)
			}
			onlyEntries(t, dir, "out")
		})
	}
}

func TestMode(t *testing.T) {
	tests := []struct {
		name  string
		umask int
		perm  fs.FileMode
		want  fs.FileMode
	}{
		{"default umask", 0o022, 0, 0o644},
		{"private umask", 0o077, 0, 0o600},
		{"open umask", 0, 0, 0o666},
		{"private input", 0o022, 0o600, 0o600},
		{"read-only input", 0o022, 0o444, 0o444},
		{"executable input gains nothing", 0, 0o755, 0o644},
		{"input wider than the umask allows", 0o027, 0o666, 0o640},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			old := syscall.Umask(tc.umask)
			defer syscall.Umask(old)
			dir := t.TempDir()
			p := filepath.Join(dir, "out")
			if err := WriteWith(p, Options{Perm: tc.perm}, func(w io.Writer) error { _, err := w.Write([]byte("x")); return err }); err != nil {
				t.Fatal(err)
			}
			if got := lstatMode(t, p).Perm(); got != tc.want {
				t.Fatalf("mode %v, want %v", got, tc.want)
			}
		})
	}
}
