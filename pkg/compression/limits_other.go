//go:build !unix

package compression

// addressSpaceLimit reports no limit where rlimits do not exist.
func addressSpaceLimit() (int64, bool) { return 0, false }
