// Package mapfile opens an input file for reading piece by piece without
// loading it whole: the file is mapped read-only into memory where the
// system allows it, and read with positioned reads where it does not (an
// address-space limit smaller than the file, a file system without mmap).
//
// Mapped pages belong to the page cache, not to the process's anonymous
// memory: the kernel can drop and re-read them under memory pressure, so a
// file larger than the memory a process may use can still be read.
//
// Only regular files are opened. Anything else (a directory, a FIFO, a
// device such as /dev/zero, a socket) is refused with ErrNotRegular before a
// byte is read; a FIFO is never opened, so nothing waits for a writer.
package mapfile

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"syscall"

	"github.com/kv-cache-p2p/validation/pkg/atomicfile"
)

// ErrNotRegular is returned when an input path is not a regular file.
var ErrNotRegular = errors.New("mapfile: input is not a regular file")

// File is an open input. It is safe for concurrent ReadAt calls.
type File struct {
	f    *os.File
	size int64
	mode fs.FileMode
	data []byte // the read-only mapping; nil when the file is not mapped
}

// Open opens path for reading and maps it when mmap is true and the system
// allows it. Symbolic links are followed; the file they lead to must be regular.
func Open(path string, mmap bool) (*File, error) {
	// Look before opening: opening a FIFO blocks until a writer appears, and
	// opening some devices has side effects.
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s: %w (it is %s)", path, ErrNotRegular, atomicfile.Kind(fi.Mode()))
	}
	// O_NONBLOCK: should the path have been swapped for a FIFO since the
	// Stat, the open still returns at once and the check below refuses it.
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	if !st.Mode().IsRegular() || !os.SameFile(fi, st) {
		f.Close()
		return nil, fmt.Errorf("%s: %w (it changed while being opened)", path, ErrNotRegular)
	}
	m := &File{f: f, size: st.Size(), mode: st.Mode()}
	if mmap && m.size > 0 && int64(int(m.size)) == m.size {
		sc, err := f.SyscallConn()
		if err == nil {
			sc.Control(func(fd uintptr) {
				data, err := syscall.Mmap(int(fd), 0, int(m.size), syscall.PROT_READ, syscall.MAP_SHARED)
				if err == nil {
					m.data = data
				}
			})
		}
	}
	return m, nil
}

// Size is the file's size in bytes when it was opened.
func (m *File) Size() int64 { return m.size }

// Mode is the file's mode when it was opened.
func (m *File) Mode() fs.FileMode { return m.mode }

// Bytes is the whole file as a read-only mapping, or nil when it is not
// mapped. Writing to it faults. Reading a page that the file no longer has
// (it was truncated meanwhile) raises SIGBUS, which Go turns into a panic
// only in goroutines that called debug.SetPanicOnFault.
func (m *File) Bytes() []byte { return m.data }

// Mapped reports whether the file is mapped.
func (m *File) Mapped() bool { return m.data != nil }

// ReadAt reads len(p) bytes at offset off, from the mapping when there is one.
func (m *File) ReadAt(p []byte, off int64) (int, error) {
	if m.data == nil {
		return m.f.ReadAt(p, off)
	}
	if off < 0 {
		return 0, fmt.Errorf("mapfile: negative offset %d", off)
	}
	if off >= int64(len(m.data)) {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	n := copy(p, m.data[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// Close unmaps and closes the file. Slices obtained from Bytes must not be
// used afterwards.
func (m *File) Close() error {
	var err error
	if m.data != nil {
		err = syscall.Munmap(m.data)
		m.data = nil
	}
	if cerr := m.f.Close(); err == nil {
		err = cerr
	}
	return err
}
