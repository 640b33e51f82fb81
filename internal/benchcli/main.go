// Command benchcli times the kv-compress binary end to end against cp of the
// same file, interleaved in one run, and measures the binary's peak memory on
// a large cache. It is what `make bench-cli` runs; docs/benchmarks.md records
// its output.
//
// Usage:
//
//	go run ./internal/benchcli -bin bin/kv-compress [-dir DIR] [-tokens 4096] [-rounds 7]
//	    [-baseline OLD-BINARY] [-big-tokens 30720] [-limit-mib 256]
package main

import (
	"flag"
	"fmt"
	"os"
)

func main() {
	var o options
	flag.StringVar(&o.bin, "bin", "bin/kv-compress", "the kv-compress binary to time")
	flag.StringVar(&o.baseline, "baseline", "", "another kv-compress binary timed in the same rounds (e.g. an older build)")
	flag.StringVar(&o.dir, "dir", os.TempDir(), "folder for the caches and outputs (on the disk to measure)")
	flag.IntVar(&o.tokens, "tokens", 4096, "tokens of the speed cache (4096: 92.3 MB of float16)")
	flag.IntVar(&o.rounds, "rounds", 7, "interleaved rounds of every case (0 skips the speed part)")
	flag.IntVar(&o.bigTokens, "big-tokens", 0, "tokens of the memory cache (30720: 692 MB); 0 skips the memory part")
	flag.IntVar(&o.limitMiB, "limit-mib", 0, "also run the memory cache's round trip in a memory cgroup of this many MiB (needs root and cgroup v1); 0 skips it")
	flag.Parse()
	if err := run(o, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "benchcli:", err)
		os.Exit(1)
	}
}
