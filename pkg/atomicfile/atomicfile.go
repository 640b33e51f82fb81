// Package atomicfile writes files so that readers see either the old content
// or the complete new content, never a partial file.
//
// The data is written to a temporary file in the target's directory, synced
// (unless the caller opts out), and renamed over the target only when the
// caller commits. On any error, or without a commit, the temporary file is
// removed and the target is left untouched.
//
// Only regular files are written. A target that exists and is anything else
// (a directory, a device node such as /dev/null, a FIFO, a socket, or a
// symbolic link, dangling or not) is refused with ErrNotRegular: replacing it
// would silently turn it into a regular file, and following a symbolic link
// in a shared folder would let whoever planted it choose where the data goes.
//
// The new file's permission bits are 0666 narrowed by Options.Perm (callers
// pass the input's mode, so a derived file is never readable by more users
// than its source) and by the process umask, as for any newly created file.
package atomicfile

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
)

// ErrSamePath is returned when an output path names the same file as an input.
var ErrSamePath = errors.New("atomicfile: output path is the input path")

// ErrNotRegular is returned when the output path exists and is not a regular
// file (including a symbolic link, which is not followed).
var ErrNotRegular = errors.New("atomicfile: output exists and is not a regular file")

// Options tune how a file is written. The zero value syncs the data before
// the rename and gives the file mode 0666 minus the umask.
type Options struct {
	// NoSync skips the fsync before the rename. The rename stays atomic for
	// readers, but after a power loss the file may be empty or partial: use
	// it only for scratch folders whose contents need not survive a crash.
	NoSync bool
	// Perm, when non-zero, bounds the permission bits: the file gets
	// 0666 & Perm, minus the umask. Pass the input's mode.
	Perm fs.FileMode
}

// File is an output being written. Write it with Write, WriteAt or ReadFrom,
// then call Commit to put it in place, or Abort to discard it. Abort after
// Commit does nothing, so `defer f.Abort()` is the usual pattern.
type File struct {
	path, tmp string
	f         *os.File
	opts      Options
	done      bool
}

// checkTarget refuses an existing path that is not a regular file.
func checkTarget(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("atomicfile: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%w: %s is %s", ErrNotRegular, path, Kind(fi.Mode()))
	}
	return nil
}

// Kind names the type of a file mode in words, for error messages.
func Kind(m fs.FileMode) string {
	switch {
	case m.IsRegular():
		return "a regular file"
	case m&fs.ModeSymlink != 0:
		return "a symbolic link"
	case m.IsDir():
		return "a directory"
	case m&fs.ModeNamedPipe != 0:
		return "a FIFO"
	case m&fs.ModeSocket != 0:
		return "a socket"
	case m&fs.ModeCharDevice != 0:
		return "a character device"
	case m&fs.ModeDevice != 0:
		return "a block device"
	}
	return "not a regular file"
}

// Create starts writing path. The temporary file lives next to path, so the
// final rename never crosses file systems.
func Create(path string, opts Options) (*File, error) {
	if err := checkTarget(path); err != nil {
		return nil, err
	}
	perm := fs.FileMode(0o666)
	if opts.Perm != 0 {
		perm &= opts.Perm.Perm()
	}
	dir, base := filepath.Dir(path), filepath.Base(path)
	for try := 0; ; try++ {
		tmp := filepath.Join(dir, "."+base+".tmp-"+strconv.FormatUint(uint64(rand.Uint32()), 36))
		// O_EXCL: never reuse a name someone else created; the kernel
		// applies the umask to perm.
		f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_EXCL, perm)
		if errors.Is(err, fs.ErrExist) && try < 100 {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("atomicfile: create %s: %w", path, err)
		}
		return &File{path: path, tmp: tmp, f: f, opts: opts}, nil
	}
}

// Write appends p at the file's current offset.
func (f *File) Write(p []byte) (int, error) { return f.f.Write(p) }

// WriteAt writes p at offset off; it is safe for concurrent use on
// non-overlapping ranges.
func (f *File) WriteAt(p []byte, off int64) (int, error) { return f.f.WriteAt(p, off) }

// ReadFrom appends what r yields at the file's current offset. When r is an
// *os.File, or an io.LimitedReader over one, the copy stays in the kernel
// (copy_file_range on Linux).
func (f *File) ReadFrom(r io.Reader) (int64, error) { return f.f.ReadFrom(r) }

// Commit syncs the data (unless Options.NoSync), closes the file and renames
// it over the target. The target is checked again just before the rename,
// so a path that became a symbolic link or a device meanwhile is refused.
func (f *File) Commit() (err error) {
	if f.done {
		return fmt.Errorf("atomicfile: %s: already committed or aborted", f.path)
	}
	defer func() {
		if err != nil {
			f.Abort()
		}
	}()
	if !f.opts.NoSync {
		if err := f.f.Sync(); err != nil {
			return fmt.Errorf("atomicfile: sync %s: %w", f.path, err)
		}
	}
	if err := f.f.Close(); err != nil {
		return fmt.Errorf("atomicfile: close %s: %w", f.path, err)
	}
	if err := checkTarget(f.path); err != nil {
		return err
	}
	if err := os.Rename(f.tmp, f.path); err != nil {
		return fmt.Errorf("atomicfile: %w", err)
	}
	f.done = true
	return nil
}

// Abort discards the temporary file. It does nothing after Commit or a
// previous Abort.
func (f *File) Abort() {
	if f.done {
		return
	}
	f.done = true
	f.f.Close()
	os.Remove(f.tmp)
}

// Write creates or replaces path with the bytes that fn writes, with the
// default Options. fn receives a buffered writer; it must not retain it after
// returning.
func Write(path string, fn func(w io.Writer) error) error {
	return WriteWith(path, Options{}, fn)
}

// WriteWith is Write with explicit Options.
func WriteWith(path string, opts Options, fn func(w io.Writer) error) error {
	f, err := Create(path, opts)
	if err != nil {
		return err
	}
	defer f.Abort()
	bw := bufio.NewWriterSize(f.f, 1<<20)
	if err := fn(bw); err != nil {
		return err
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("atomicfile: write %s: %w", path, err)
	}
	return f.Commit()
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
