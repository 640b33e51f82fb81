// Package atomicfile writes files so that readers see either the old content
// or the complete new content, never a partial file.
//
// The data is written to a temporary file in the target's directory, synced,
// and renamed over the target only after the writer function succeeded. On any
// error the temporary file is removed and the target is left untouched.
package atomicfile

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// ErrSamePath is returned when an output path names the same file as an input.
var ErrSamePath = errors.New("atomicfile: output path is the input path")

// Write creates or replaces path with the bytes that fn writes. The file gets
// mode 0644 (subject to the umask). fn receives a buffered writer; it must not
// retain it after returning.
func Write(path string, fn func(w io.Writer) error) (err error) {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("atomicfile: %w", err)
	}
	name := tmp.Name()
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(name)
		}
	}()
	bw := bufio.NewWriterSize(tmp, 1<<20)
	if err = fn(bw); err != nil {
		return err
	}
	if err = bw.Flush(); err != nil {
		return fmt.Errorf("atomicfile: write %s: %w", path, err)
	}
	if err = tmp.Chmod(0o644); err != nil {
		return fmt.Errorf("atomicfile: %w", err)
	}
	if err = tmp.Sync(); err != nil {
		return fmt.Errorf("atomicfile: sync %s: %w", path, err)
	}
	if err = tmp.Close(); err != nil {
		return fmt.Errorf("atomicfile: close %s: %w", path, err)
	}
	if err = os.Rename(name, path); err != nil {
		return fmt.Errorf("atomicfile: %w", err)
	}
	return nil
}

// CheckDistinct returns ErrSamePath when out names the same file as in,
// either by path or, for an existing output, by identity (hard or symbolic links).
func CheckDistinct(in, out string) error {
	ai, err1 := filepath.Abs(in)
	ao, err2 := filepath.Abs(out)
	if err1 == nil && err2 == nil && ai == ao {
		return fmt.Errorf("%w: %s", ErrSamePath, out)
	}
	si, err := os.Stat(in)
	if err != nil {
		return nil
	}
	so, err := os.Stat(out)
	if err != nil {
		return nil
	}
	if os.SameFile(si, so) {
		return fmt.Errorf("%w: %s", ErrSamePath, out)
	}
	return nil
}
