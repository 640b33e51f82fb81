package compression

import (
	"errors"
	"fmt"
	"io/fs"
	"runtime/debug"

	"github.com/kv-cache-p2p/validation/pkg/mapfile"
	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// ErrInputChanged is returned when a mapped input file shrank while it was
// being read (the kernel then raises SIGBUS on the missing pages).
var ErrInputChanged = errors.New("compression: input file changed while it was read")

// mapInputs says whether input files are memory-mapped; tests turn it off to
// exercise the positioned-read path that an address-space limit forces.
var mapInputs = true

// source is a parsed safetensors file whose tensor bytes are either in
// memory (Data set: a File built by the caller, or a mapped file) or read on
// demand from the file at the recorded offsets (Data nil).
type source struct {
	f    *safetensors.File
	size int64       // the file's size in bytes
	mode fs.FileMode // the file's mode; 0 for a File held in memory
	file *mapfile.File
	off  map[string]int64 // absolute offset of each tensor not in memory
}

// memorySource wraps a File held in memory.
func memorySource(f *safetensors.File) *source { return &source{f: f} }

// openSource opens and parses the safetensors file at path, refusing
// anything but a regular file before reading it. Only the header is read
// here; tensor bytes are reached through data.
func openSource(path string) (s *source, err error) {
	m, err := mapfile.Open(path, mapInputs)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			m.Close()
		}
	}()
	s = &source{size: m.Size(), mode: m.Mode(), file: m}
	if m.Mapped() {
		err = guardFaults(func() (err error) {
			s.f, err = safetensors.Parse(m.Bytes())
			return err
		})
	} else if s.f, err = safetensors.ReadHeader(m, m.Size()); err == nil {
		s.off = make(map[string]int64, len(s.f.Tensors))
		at := 8 + s.f.HeaderSize
		for i := range s.f.Tensors {
			t := &s.f.Tensors[i]
			s.off[t.Name] = at
			at += t.ByteLen()
		}
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return s, nil
}

// data returns t's bytes: t.Data when it is in memory, otherwise the bytes
// read from the file into *buf, which grows as needed and is reused.
func (s *source) data(t *safetensors.Tensor, buf *[]byte) ([]byte, error) {
	if t.Data != nil || s.off == nil {
		return t.Data, nil
	}
	n := t.ByteLen()
	*buf = grow(*buf, int(n))
	if _, err := s.file.ReadAt(*buf, s.off[t.Name]); err != nil {
		return nil, fmt.Errorf("read tensor %q: %w", t.Name, err)
	}
	return *buf, nil
}

// close releases the file; tensors' Data must not be used afterwards.
func (s *source) close() {
	if s.file != nil {
		s.file.Close()
	}
}

// guardFaults runs fn and turns a memory fault in it into ErrInputChanged.
// A mapped file that another process truncates raises SIGBUS on the pages
// it lost; without this the CLI would crash instead of reporting an error.
// Other panics are not hidden.
func guardFaults(fn func() error) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			if _, ok := r.(interface{ Addr() uintptr }); ok {
				err = fmt.Errorf("%w (%v)", ErrInputChanged, r)
				return
			}
			panic(r)
		}
	}()
	return fn()
}
