package compression

import (
	"bufio"
	"errors"
	"fmt"
	"math"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// Errors of the resource limits.
var (
	// ErrTooLarge means a file declares more data than the memory budget
	// allows (an invalid input for this machine: exit 3).
	ErrTooLarge = errors.New("compression: exceeds the memory budget")
	// ErrInternal marks a bug caught at run time (a recovered panic); no output is written.
	ErrInternal = errors.New("compression: internal error")
)

// MaxWorkersPerCPU caps the worker count at this many per CPU (GOMAXPROCS):
// more only multiplies the working memory without adding speed.
const MaxWorkersPerCPU = 4

// fallbackMaxMemory is the budget when the machine's memory cannot be read.
const fallbackMaxMemory = 4 << 30

// perTensorOverhead is what each tensor of a file costs in bookkeeping
// (index entry, report, header text, slices) beyond its data, an upper
// estimate used by the budget.
const perTensorOverhead = 1 << 10

// capWorkers returns the worker count for a request of w (0: one per CPU),
// capped at MaxWorkersPerCPU per CPU.
func capWorkers(w int) int {
	procs := runtime.GOMAXPROCS(0)
	if w <= 0 {
		return procs
	}
	return min(w, MaxWorkersPerCPU*procs)
}

// DefaultMaxMemory is the memory budget used when none is given: three
// quarters of the smallest of the machine's memory (MemTotal in
// /proc/meminfo) and the process's cgroup memory limit, and at most half of
// what its address-space and data limits (RLIMIT_AS, RLIMIT_DATA) leave
// after 1 GiB for the Go runtime (the garbage collector may need twice the
// live heap). 4 GiB when none of these can be read. It is computed once.
var DefaultMaxMemory = sync.OnceValue(func() int64 {
	var budget int64 = math.MaxInt64
	phys := int64(math.MaxInt64)
	if v, ok := memTotal(); ok {
		phys = min(phys, v)
	}
	for _, p := range []string{"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"} {
		if v, ok := readInt(p); ok && v > 0 {
			phys = min(phys, v)
		}
	}
	if phys != math.MaxInt64 {
		budget = phys / 4 * 3
	}
	if v, ok := addressSpaceLimit(); ok {
		budget = min(budget, max(v-1<<30, 0)/2)
	}
	if budget == math.MaxInt64 {
		return fallbackMaxMemory
	}
	return max(budget, 64<<20)
})

func memTotal() (int64, bool) {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0, false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 2 && fields[0] == "MemTotal:" {
			kb, err := strconv.ParseInt(fields[1], 10, 64)
			if err != nil || kb <= 0 || kb > math.MaxInt64/1024 {
				return 0, false
			}
			return kb * 1024, true
		}
	}
	return 0, false
}

// readInt reads a file holding one decimal integer ("max" or garbage: false).
func readInt(path string) (int64, bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, false
	}
	v, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	return v, err == nil
}

// sizeUnits are the suffixes ParseSize accepts: decimal (kB, MB, GB, TB) and
// binary (KiB, MiB, GiB, TiB; K, M, G, T mean the binary ones).
var sizeUnits = []struct {
	suffix string
	mult   float64
}{
	{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40},
	{"kB", 1e3}, {"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12},
	{"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"T", 1 << 40}, {"B", 1},
}

// ParseSize parses a byte count such as "2GiB", "1.5G", "500MB" or
// "1073741824". The result is positive and at most 2^62.
func ParseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	mult := 1.0
	for _, u := range sizeUnits {
		if strings.HasSuffix(t, u.suffix) {
			t, mult = strings.TrimSpace(strings.TrimSuffix(t, u.suffix)), u.mult
			break
		}
	}
	v, err := strconv.ParseFloat(t, 64)
	if err != nil || !(v > 0) || v*mult > 1<<62 || t != strings.TrimLeft(t, "+") {
		return 0, fmt.Errorf("%w: size must be a positive number of bytes with an optional unit (B, kB, MB, GB, TB, KiB, MiB, GiB, TiB), got %q", ErrConfig, s)
	}
	n := int64(v * mult)
	if n < 1 {
		return 0, fmt.Errorf("%w: size %q is less than one byte", ErrConfig, s)
	}
	return n, nil
}

// formatSize writes a byte count for people: "1.50 GiB".
func formatSize(n int64) string {
	switch {
	case n >= 1<<30:
		return strconv.FormatFloat(float64(n)/(1<<30), 'f', 2, 64) + " GiB"
	case n >= 1<<20:
		return strconv.FormatFloat(float64(n)/(1<<20), 'f', 2, 64) + " MiB"
	default:
		return strconv.FormatInt(n, 10) + " bytes"
	}
}

// satAdd adds non-negative sizes, saturating at MaxInt64 instead of wrapping.
func satAdd(a, b int64) int64 {
	if a > math.MaxInt64-b {
		return math.MaxInt64
	}
	return a + b
}

// satMul multiplies non-negative sizes, saturating at MaxInt64.
func satMul(a, b int64) int64 {
	if a != 0 && b > math.MaxInt64/a {
		return math.MaxInt64
	}
	return a * b
}

// budgetWorkers fits a job into budget bytes: fixed is what it needs whatever
// the worker count, perWorker what each worker's buffers need at most. It
// returns how many of the wanted workers fit (at least 1), or an error
// wrapping ErrTooLarge naming what was asked when not even one does.
func budgetWorkers(budget, fixed, perWorker int64, want int) (int, error) {
	need := satAdd(fixed, perWorker)
	if need > budget {
		return 0, fmt.Errorf("%w: this file needs at least %s of memory, the budget is %s (--max-memory)",
			ErrTooLarge, formatSize(need), formatSize(budget))
	}
	if perWorker == 0 {
		return want, nil
	}
	return int(max(1, min(int64(want), (budget-fixed)/perWorker))), nil
}

// outputBytes is the memory the restored tensors of idx take, with the
// per-tensor bookkeeping; sizes were validated by ReadIndex.
func (idx *Index) outputBytes() int64 {
	var total int64
	for i := range idx.Entries {
		e := &idx.Entries[i]
		n, _ := safetensors.NumElements(e.Shape)
		size, _ := safetensors.ByteSize(n, safetensors.DType(e.DType))
		total = satAdd(total, satAdd(size, perTensorOverhead))
	}
	return total
}

// maxScratch is the most working memory one worker needs to decode any
// entry of idx: the raw payloads plus two float32 buffers of the tensor's
// elements (reconstruction and layout); stored entries decode in place.
func (idx *Index) maxScratch() int64 {
	var most int64
	for i := range idx.Entries {
		e := &idx.Entries[i]
		if e.Mode == ModeStored {
			continue
		}
		n, _ := safetensors.NumElements(e.Shape)
		need := satMul(n, 8)
		if e.Projection != nil { // coefficients (as float32, twice) and the basis, mean and transposed basis as float32
			need = satAdd(need, satMul(n, 8))
			need = satAdd(need, satMul(e.Projection.Basis.RawBytes, 4))
		}
		for _, p := range e.payloads() {
			if p != nil {
				need = satAdd(need, p.RawBytes)
			}
		}
		most = max(most, need)
	}
	return most
}

// containerEntryBytes is a lower bound on what one tensor adds to its
// container's header: its index entry (escaped inside a metadata string) and
// its payload's entry, with a one-byte name.
const containerEntryBytes = 150

// compressBudget checks that compressing src fits: its container's header
// (index entries and the copied metadata) within what safetensors allows, and the encoded payloads plus each worker's
// buffers within cfg's memory budget. It returns how many workers fit.
//
// With inMemory the encoded payloads stay in memory until the end (at most
// the input's size); a file writer streams them to disk, and then each
// worker also holds the tensor it reads when the input is not mapped.
func compressBudget(src *safetensors.File, cfg Config, inMemory bool) (int, error) {
	var header, fixed, scratch int64
	for i := range src.Tensors {
		t := &src.Tensors[i]
		size := t.ByteLen() // Data is not loaded when the file is read tensor by tensor
		header = satAdd(header, containerEntryBytes+3*int64(len(t.Name)))
		fixed = satAdd(fixed, perTensorOverhead)
		if inMemory {
			fixed = satAdd(fixed, size)
		}
		read := int64(0) // the tensor read into a worker buffer
		if !inMemory {
			read = size
		}
		if t.DType.IsFloat() {
			// float32 copies of the tensor (decoded, rows, layout,
			// reconstruction, magnitudes with sparsity) and its codes.
			per := int64(21)
			if cfg.Projection != nil { // float32 copies of the tensor, its coefficients and their bytes
				per += 16
			}
			scratch = max(scratch, satAdd(satMul(t.NumElements(), per), satAdd(size, read)))
		} else {
			scratch = max(scratch, read)
		}
	}
	for k, v := range src.Metadata { // copied as source_metadata: `"k":"v",` with its quotes escaped
		header = satAdd(header, int64(len(k)+len(v)+10))
	}
	if header > safetensors.MaxHeaderSize {
		return 0, fmt.Errorf("%w: %d tensors and %d metadata keys need a container header of at least %d bytes",
			safetensors.ErrHeaderTooLarge, len(src.Tensors), len(src.Metadata), header)
	}
	return budgetWorkers(cfg.maxMemory(), fixed, scratch, cfg.workers())
}
