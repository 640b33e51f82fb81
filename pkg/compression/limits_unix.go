//go:build unix

package compression

import (
	"math"
	"syscall"
)

// addressSpaceLimit returns the smaller of the soft RLIMIT_AS and RLIMIT_DATA
// limits, and false when both are unlimited.
func addressSpaceLimit() (int64, bool) {
	limit := uint64(math.MaxUint64)
	for _, res := range []int{syscall.RLIMIT_AS, syscall.RLIMIT_DATA} {
		var rl syscall.Rlimit
		if syscall.Getrlimit(res, &rl) == nil && rl.Cur < math.MaxInt64 { // RLIM_INFINITY is all ones
			limit = min(limit, rl.Cur)
		}
	}
	if limit >= math.MaxInt64 {
		return 0, false
	}
	return int64(limit), true
}
