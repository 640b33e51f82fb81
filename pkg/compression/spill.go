package compression

import (
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync/atomic"

	"github.com/kv-cache-p2p/validation/pkg/atomicfile"
	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// spill holds encoded payloads in an unlinked scratch file beside the
// output until the container's header, which lists every payload's size,
// can be written. Each tensor's payloads are stored contiguously, at an
// offset reserved when its worker finishes it.
type spill struct {
	f    *os.File
	next atomic.Int64
	at   []int64 // where tensor i's payloads start in f
}

// newSpill creates the scratch file for n tensors in out's folder (the same
// file system, so the final copy can stay in the kernel) and unlinks it at
// once: nothing is left behind, however the process ends.
func newSpill(out string, n int) (*spill, error) {
	f, err := os.CreateTemp(filepath.Dir(out), "."+filepath.Base(out)+".scratch-*")
	if err != nil {
		return nil, err
	}
	os.Remove(f.Name())
	return &spill{f: f, at: make([]int64, n)}, nil
}

// put stores tensor i's payloads and drops them from memory (Data = nil).
// It is safe for concurrent use by the workers.
func (s *spill) put(i int, ct *compressedTensor) error {
	var n int64
	for _, p := range ct.payload {
		n += int64(len(p.Data))
	}
	off := s.next.Add(n) - n
	s.at[i] = off
	for k := range ct.payload {
		p := &ct.payload[k]
		if _, err := s.f.WriteAt(p.Data, off); err != nil {
			return err
		}
		off += int64(len(p.Data))
		p.Data = nil
	}
	return nil
}

// writeContainer writes res's header and then every tensor's payloads, in
// order, copied from the scratch file (adjacent runs in one copy).
func (s *spill) writeContainer(dst *atomicfile.File, res *Result, cts []compressedTensor) error {
	hdr, _, err := safetensors.LayoutHeader(res.Tensors, res.Metadata)
	if err != nil {
		return err
	}
	head := make([]byte, 8, 8+len(hdr))
	binary.LittleEndian.PutUint64(head, uint64(len(hdr)))
	if _, err := dst.Write(append(head, hdr...)); err != nil {
		return err
	}
	at := int64(len(head) + len(hdr)) // where the next run lands in dst
	copyRun := func(off, n int64) error {
		if n == 0 {
			return nil
		}
		if _, err := s.f.Seek(off, io.SeekStart); err != nil {
			return err
		}
		got, err := dst.ReadFrom(io.LimitReader(s.f, n))
		if err == nil && got != n {
			err = fmt.Errorf("scratch file holds %d of %d bytes", got, n)
		}
		// The disk writes this run while the next ones are copied; the
		// fsync of Commit then waits for what is left.
		dst.StartWriteback(at, n)
		at += n
		return err
	}
	var runOff, runLen int64
	for i := range cts {
		var n int64
		for k := range cts[i].payload {
			n += cts[i].payload[k].ByteLen()
		}
		if s.at[i] != runOff+runLen {
			if err := copyRun(runOff, runLen); err != nil {
				return err
			}
			runOff, runLen = s.at[i], 0
		}
		runLen += n
	}
	return copyRun(runOff, runLen)
}

// close releases the scratch file (already unlinked).
func (s *spill) close() { s.f.Close() }
