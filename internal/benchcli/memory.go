package main

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// runMemory measures the binary's peak memory on a large cache, and, with a
// limit, runs the round trip inside a memory cgroup smaller than the cache.
func runMemory(o options, w io.Writer) error {
	in := filepath.Join(o.dir, fmt.Sprintf("bench-cache-%d.safetensors", o.bigTokens))
	size, err := ensureCache(in, o.bigTokens)
	if err != nil {
		return err
	}
	kvc := filepath.Join(o.dir, "big.kvc")
	restored := filepath.Join(o.dir, "big-restored.safetensors")
	fmt.Fprintf(w, "\n## Peak memory on a %.0f MB float16 cache\n\n", float64(size)/1e6)
	fmt.Fprintln(w, "peak RssAnon is sampled from /proc/PID/status every millisecond; maxrss (getrusage) also counts the mapped input's page-cache pages.")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| command | wall s | peak RssAnon MB | ÷ cache size | maxrss MB | target |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|")
	type memCase struct {
		name string
		args []string
	}
	cases := []memCase{
		{"compress (default codec)", []string{o.bin, "compress", "-i", in, "-o", kvc}},
		{"decompress", []string{o.bin, "decompress", "-i", kvc, "-o", restored}},
	}
	if o.baseline != "" {
		old := filepath.Join(o.dir, "big-baseline.safetensors")
		defer os.Remove(old)
		cases = append(cases,
			memCase{"compress (default codec) [baseline]", []string{o.baseline, "compress", "-i", in, "-o", kvc}},
			memCase{"decompress [baseline]", []string{o.baseline, "decompress", "-i", kvc, "-o", old}})
	}
	for _, c := range cases {
		m, err := runCmd(c.args, true)
		if err != nil {
			return err
		}
		r := float64(m.peakAnon) / float64(size)
		verdict := "≤ 0.35× — met"
		if r > 0.35 {
			verdict = "≤ 0.35× — NOT met"
		}
		fmt.Fprintf(w, "| %s | %.2f | %.1f | %.3f× | %.1f | %s |\n", c.name, m.wall.Seconds(), float64(m.peakAnon)/1e6, r, float64(m.maxRSS)/1e6, verdict)
	}
	if o.limitMiB > 0 {
		if err := runLimited(o, w, in, size, restored); err != nil {
			fmt.Fprintf(w, "\nmemory-cgroup run: skipped (%v)\n", err)
		}
	}
	os.Remove(kvc)
	os.Remove(restored)
	return nil
}

// runLimited runs compress and decompress of in inside a cgroup-v1 memory
// cgroup limited to o.limitMiB, and checks that the restored file is
// byte-identical to the one restored without a limit.
func runLimited(o options, w io.Writer, in string, size int64, reference string) error {
	cg := filepath.Join("/sys/fs/cgroup/memory", fmt.Sprintf("kv-benchcli-%d", os.Getpid()))
	if err := os.Mkdir(cg, 0o755); err != nil {
		return err
	}
	defer os.Remove(cg)
	limit := int64(o.limitMiB) << 20
	if err := os.WriteFile(filepath.Join(cg, "memory.limit_in_bytes"), []byte(strconv.FormatInt(limit, 10)), 0o644); err != nil {
		return err
	}
	kvc := filepath.Join(o.dir, "big-limited.kvc")
	restored := filepath.Join(o.dir, "big-limited.safetensors")
	defer os.Remove(kvc)
	defer os.Remove(restored)
	// The shell moves itself into the cgroup, then becomes kv-compress.
	wrap := func(args ...string) []string {
		return append([]string{"sh", "-c", `echo $$ > "$0/cgroup.procs" && exec "$@"`, cg}, args...)
	}
	fmt.Fprintf(w, "\nIn a memory cgroup limited to %d MiB (the cache is %.0f MiB):\n\n", o.limitMiB, float64(size)/(1<<20))
	for _, args := range [][]string{
		{o.bin, "compress", "-i", in, "-o", kvc},
		{o.bin, "decompress", "-i", kvc, "-o", restored},
	} {
		os.WriteFile(filepath.Join(cg, "memory.max_usage_in_bytes"), []byte("0"), 0o644) // reset the peak
		m, err := runCmd(wrap(args...), true)
		if err != nil {
			return err
		}
		peak, _ := os.ReadFile(filepath.Join(cg, "memory.max_usage_in_bytes"))
		fail, _ := os.ReadFile(filepath.Join(cg, "memory.failcnt"))
		fmt.Fprintf(w, "- `%s`: exit 0 in %.2f s, peak RssAnon %.1f MB, cgroup peak usage (anonymous + page cache) %s bytes, limit hits %s\n",
			strings.Join(args[1:2], " "), m.wall.Seconds(), float64(m.peakAnon)/1e6, strings.TrimSpace(string(peak)), strings.TrimSpace(string(fail)))
	}
	if o.baseline != "" {
		os.WriteFile(filepath.Join(cg, "memory.max_usage_in_bytes"), []byte("0"), 0o644)
		old := filepath.Join(o.dir, "big-limited-baseline.kvc")
		_, err := runCmd(wrap(o.baseline, "compress", "-i", in, "-o", old), false)
		os.Remove(old)
		outcome := "exit 0"
		if err != nil {
			outcome = err.Error()
			if i := strings.Index(outcome, ": "); i >= 0 && strings.HasPrefix(outcome, "sh ") {
				outcome = outcome[i+2:]
			}
		}
		fmt.Fprintf(w, "- the baseline's `compress` in the same cgroup: %s\n", strings.TrimSpace(outcome))
	}
	same, err := sameContent(restored, reference)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "- restored file byte-identical to the one restored without a limit: %v\n", same)
	return nil
}

// sameContent compares two files a megabyte at a time.
func sameContent(a, b string) (bool, error) {
	fa, err := os.Open(a)
	if err != nil {
		return false, err
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		return false, err
	}
	defer fb.Close()
	ba, bb := make([]byte, 1<<20), make([]byte, 1<<20)
	for {
		na, ea := io.ReadFull(fa, ba)
		nb, eb := io.ReadFull(fb, bb)
		if na != nb || !bytes.Equal(ba[:na], bb[:nb]) {
			return false, nil
		}
		if ea != nil || eb != nil {
			return ea == eb || (ea == io.ErrUnexpectedEOF && eb == io.ErrUnexpectedEOF), nil
		}
	}
}
