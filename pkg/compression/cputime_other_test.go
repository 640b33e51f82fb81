//go:build !unix

package compression

// cpuSeconds is unknown here: benchmarks report no CPU-time throughput.
func cpuSeconds() float64 { return 0 }
