package atomicfile

import "syscall"

// syncFileRangeWrite is SYNC_FILE_RANGE_WRITE: start writing the range's
// dirty pages to the disk, without waiting for them.
const syncFileRangeWrite = 2

// StartWriteback asks the kernel to start writing bytes [off, off+n) to the
// disk now (sync_file_range with SYNC_FILE_RANGE_WRITE), so that the fsync of
// Commit finds most of the file already written instead of writing it all
// then. It does nothing under Options.NoSync. It is only a hint: it neither
// waits for the disk nor makes anything durable, and its errors are ignored
// (Commit's fsync reports real I/O errors).
func (f *File) StartWriteback(off, n int64) {
	if f.opts.NoSync || n <= 0 {
		return
	}
	rc, err := f.f.SyscallConn()
	if err != nil {
		return
	}
	rc.Control(func(fd uintptr) { _ = syscall.SyncFileRange(int(fd), off, n, syncFileRangeWrite) })
}
