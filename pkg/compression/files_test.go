package compression

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/kv-cache-p2p/validation/pkg/atomicfile"
	"github.com/kv-cache-p2p/validation/pkg/mapfile"
	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// withMapping runs fn with input mapping on or off, restoring it afterwards.
func withMapping(t *testing.T, on bool, fn func()) {
	t.Helper()
	old := mapInputs
	mapInputs = on
	defer func() { mapInputs = old }()
	fn()
}

// noLeftovers fails when dir holds a temporary or scratch file.
func noLeftovers(t *testing.T, dir string) {
	t.Helper()
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if strings.Contains(e.Name(), ".tmp-") || strings.Contains(e.Name(), ".scratch-") {
			t.Errorf("left behind: %s", e.Name())
		}
	}
}

// The streaming file path (tensor by tensor in, payloads through a scratch
// file, outputs written at offsets) writes exactly the bytes of the
// in-memory codec, whether the input is mapped or read with positioned reads.
func TestFilesMatchInMemory(t *testing.T) {
	mixed, err := safetensors.ReadFile(filepath.Join(goldenDir, "mixed.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	inputs := map[string]*safetensors.File{
		"f16 cache":  kvCache(t, 3, 2, 128, 64, safetensors.F16, 7),
		"bf16 cache": kvCache(t, 2, 2, 64, 128, safetensors.BF16, 8),
		"mixed":      mixed,
	}
	asym := DefaultConfig()
	asym.Scheme = SchemeAsym
	two := SeedConfig()
	two.Bits = 2
	two.GroupSize = 32
	one := DefaultConfig()
	one.Workers = 1 // one worker's arena and scratch reused by every tensor in turn
	configs := map[string]Config{"default": DefaultConfig(), "default, 1 worker": one, "seed": SeedConfig(), "asym": asym, "2-bit": two}
	for iname, src := range inputs {
		for cname, cfg := range configs {
			for _, mapped := range []bool{true, false} {
				name := iname + "/" + cname + "/unmapped"
				if mapped {
					name = iname + "/" + cname + "/mapped"
				}
				if iname == "mixed" { // its float tensor's rows hold 32 elements
					cfg.GroupSize = 32
				}
				t.Run(name, func(t *testing.T) {
					res, err := Compress(src, cfg)
					if err != nil {
						t.Fatal(err)
					}
					wantC := encodeFile(t, &safetensors.File{Tensors: res.Tensors, Metadata: res.Metadata})
					restored, err := Decompress(asContainer(t, res), 0)
					if err != nil {
						t.Fatal(err)
					}
					wantR := encodeFile(t, &safetensors.File{Tensors: restored.Tensors, Metadata: restored.Metadata})

					dir := t.TempDir()
					in, kvc, back := filepath.Join(dir, "in"), filepath.Join(dir, "c.kvc"), filepath.Join(dir, "back")
					os.WriteFile(in, encodeFile(t, src), 0o644)
					withMapping(t, mapped, func() {
						rep, err := CompressFile(in, kvc, cfg)
						if err != nil {
							t.Fatal(err)
						}
						got, _ := os.ReadFile(kvc)
						if !bytes.Equal(got, wantC) {
							t.Fatalf("container differs from the in-memory one (%d vs %d bytes)", len(got), len(wantC))
						}
						if rep.CompressedSizeBytes != int64(len(got)) || rep.Quality != res.Quality {
							t.Errorf("report: size %d of %d, quality %+v vs %+v", rep.CompressedSizeBytes, len(got), rep.Quality, res.Quality)
						}
						drep, err := DecompressFile(kvc, back, Config{NoSync: true, Workers: 3})
						if err != nil {
							t.Fatal(err)
						}
						gotR, _ := os.ReadFile(back)
						if !bytes.Equal(gotR, wantR) {
							t.Fatal("restored file differs from the in-memory restoration")
						}
						if drep.OriginalSizeBytes != int64(len(gotR)) {
							t.Errorf("report says %d bytes, file has %d", drep.OriginalSizeBytes, len(gotR))
						}
						insp, err := Inspect(kvc, InspectOptions{Verify: true})
						if err != nil || len(insp.Tensors) != len(src.Tensors) {
							t.Fatalf("inspect: %v", err)
						}
					})
					noLeftovers(t, dir)
				})
			}
		}
	}
}

// Inputs that are not regular files are refused before a byte is read, and
// outputs that are not regular files are never replaced; nothing is left.
func TestFilesRefuseNonRegular(t *testing.T) {
	dir := t.TempDir()
	in := filepath.Join(dir, "in.safetensors")
	os.WriteFile(in, encodeFile(t, kvCache(t, 1, 2, 64, 64, safetensors.F16, 3)), 0o644)
	kvc := filepath.Join(dir, "in.kvc")
	if _, err := CompressFile(in, kvc, DefaultConfig()); err != nil {
		t.Fatal(err)
	}
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	sub := filepath.Join(dir, "sub")
	os.Mkdir(sub, 0o755)
	link := filepath.Join(dir, "link")
	os.Symlink(filepath.Join(dir, "target"), link)
	tests := []struct {
		name    string
		in, out string
		decomp  bool
		want    error
	}{
		{"input /dev/zero", "/dev/zero", filepath.Join(dir, "a.kvc"), false, mapfile.ErrNotRegular},
		{"input FIFO", fifo, filepath.Join(dir, "b.kvc"), false, mapfile.ErrNotRegular},
		{"input directory", sub, filepath.Join(dir, "c.kvc"), true, mapfile.ErrNotRegular},
		{"output /dev/null", in, "/dev/null", false, atomicfile.ErrNotRegular},
		{"output FIFO", kvc, fifo, true, atomicfile.ErrNotRegular},
		{"output directory", in, sub, false, atomicfile.ErrNotRegular},
		{"output dangling symlink", kvc, link, true, atomicfile.ErrNotRegular},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before, _ := os.Lstat(tc.out)
			var err error
			if tc.decomp {
				_, err = DecompressFile(tc.in, tc.out, Config{})
			} else {
				_, err = CompressFile(tc.in, tc.out, DefaultConfig())
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if after, _ := os.Lstat(tc.out); before != nil && after.Mode() != before.Mode() {
				t.Errorf("output changed from %v to %v", before.Mode(), after.Mode())
			}
			if _, err := os.Lstat(filepath.Join(dir, "target")); err == nil {
				t.Error("a symbolic link was followed")
			}
			noLeftovers(t, dir)
		})
	}
}

// Outputs get 0666 minus the umask, never wider than the input's mode.
func TestFilesOutputMode(t *testing.T) {
	old := syscall.Umask(0o022)
	defer syscall.Umask(old)
	for _, tc := range []struct {
		name      string
		inputMode fs.FileMode
		want      fs.FileMode
	}{
		{"shared input", 0o644, 0o644},
		{"private input", 0o600, 0o600},
		{"group-readable input", 0o640, 0o640},
		{"world-writable input, umask 022", 0o666, 0o644},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			in, kvc, back := filepath.Join(dir, "in"), filepath.Join(dir, "c.kvc"), filepath.Join(dir, "back")
			os.WriteFile(in, encodeFile(t, kvCache(t, 1, 2, 64, 64, safetensors.F16, 3)), 0o600)
			os.Chmod(in, tc.inputMode)
			if _, err := CompressFile(in, kvc, DefaultConfig()); err != nil {
				t.Fatal(err)
			}
			if _, err := DecompressFile(kvc, back, Config{}); err != nil {
				t.Fatal(err)
			}
			for _, p := range []string{kvc, back} {
				fi, _ := os.Stat(p)
				if fi.Mode().Perm() != tc.want {
					t.Errorf("%s: mode %v, want %v", filepath.Base(p), fi.Mode().Perm(), tc.want)
				}
			}
		})
	}
}

// A mapped input that shrinks while it is read (the kernel raises SIGBUS on
// the lost pages) yields ErrInputChanged, not a crash.
func TestInputTruncatedWhileMapped(t *testing.T) {
	dir := t.TempDir()
	in := filepath.Join(dir, "in")
	os.WriteFile(in, encodeFile(t, kvCache(t, 2, 2, 256, 64, safetensors.F16, 5)), 0o644)
	src, err := openSource(in)
	if err != nil {
		t.Fatal(err)
	}
	defer src.close()
	if src.file == nil || !src.file.Mapped() {
		t.Skip("the input is not mapped here")
	}
	if err := os.Truncate(in, 8+src.f.HeaderSize); err != nil {
		t.Fatal(err)
	}
	if _, err := compressAll(src, DefaultConfig(), 2, nil); !errors.Is(err, ErrInputChanged) {
		t.Fatalf("err = %v, want ErrInputChanged", err)
	}
}
