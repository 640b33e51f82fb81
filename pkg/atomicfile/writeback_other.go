//go:build !linux

package atomicfile

// StartWriteback is a hint that only Linux implements (sync_file_range);
// elsewhere Commit's fsync writes the whole file.
func (f *File) StartWriteback(off, n int64) {}
