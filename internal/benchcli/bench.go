package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

type options struct {
	bin, baseline, dir  string
	tokens, rounds      int
	bigTokens, limitMiB int
}

// measured is one run of a command.
type measured struct {
	wall     time.Duration
	cpu      time.Duration // user + system time of the child
	maxRSS   int64         // getrusage's peak resident set (anonymous and file-backed pages), bytes
	peakAnon int64         // the largest RssAnon sampled from /proc every millisecond, bytes
}

// runCmd runs args to completion. With sample set it polls the child's
// /proc/PID/status for RssAnon. A non-zero exit is an error quoting stderr.
func runCmd(args []string, sample bool) (measured, error) {
	var m measured
	cmd := exec.Command(args[0], args[1:]...)
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = io.Discard, &stderr
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return m, err
	}
	done := make(chan struct{})
	sampled := make(chan int64, 1)
	if sample {
		go func() {
			var peak int64
			path := fmt.Sprintf("/proc/%d/status", cmd.Process.Pid)
			for {
				select {
				case <-done:
					sampled <- peak
					return
				default:
				}
				peak = max(peak, rssAnon(path))
				time.Sleep(time.Millisecond)
			}
		}()
	}
	err := cmd.Wait()
	m.wall = time.Since(start)
	close(done)
	if sample {
		m.peakAnon = <-sampled
	}
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		m.maxRSS = ru.Maxrss * 1024
	}
	m.cpu = cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
	if err != nil {
		return m, fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return m, nil
}

// rssAnon reads the RssAnon line of a /proc/PID/status file, in bytes (0 once the process is gone).
func rssAnon(path string) int64 {
	f, err := os.Open(path)
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "RssAnon:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			return kb * 1024
		}
	}
	return 0
}

type speedCase struct {
	name   string
	target float64 // largest wall-time ratio against cp; 0: none
	args   []string
	out    string
}

func run(o options, w io.Writer) error {
	if err := os.MkdirAll(o.dir, 0o755); err != nil {
		return err
	}
	if o.rounds > 0 {
		if err := runSpeed(o, w); err != nil {
			return err
		}
	}
	if o.bigTokens > 0 {
		return runMemory(o, w)
	}
	return nil
}

// runSpeed times every case against the cp run right before it, o.rounds times.
func runSpeed(o options, w io.Writer) error {
	in := filepath.Join(o.dir, fmt.Sprintf("bench-cache-%d.safetensors", o.tokens))
	size, err := ensureCache(in, o.tokens)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "## kv-compress end to end against cp (%s, %.1f MB float16, %d rounds)\n\n", filepath.Base(in), float64(size)/1e6, o.rounds)
	var cases []speedCase
	bins := []struct{ label, path string }{{"", o.bin}}
	if o.baseline != "" {
		bins = append(bins, struct{ label, path string }{" [baseline]", o.baseline})
	}
	for bi, b := range bins {
		p := func(s string) string { return filepath.Join(o.dir, fmt.Sprintf("b%d-%s", bi, s)) }
		// Containers to restore, made once.
		for _, seed := range []bool{false, true} {
			args := []string{b.path, "compress", "-i", in, "-o", p(kvcName(seed))}
			if seed {
				args = append(args, "--seed-scheme")
			}
			if _, err := runCmd(args, false); err != nil {
				return err
			}
		}
		cases = append(cases,
			speedCase{"compress (default codec)" + b.label, 2.5, []string{b.path, "compress", "-i", in, "-o", p("out.kvc")}, p("out.kvc")},
			speedCase{"compress --no-sync" + b.label, 0, []string{b.path, "compress", "-i", in, "-o", p("out.kvc"), "--no-sync"}, p("out.kvc")},
			speedCase{"decompress (default codec)" + b.label, 2.0, []string{b.path, "decompress", "-i", p(kvcName(false)), "-o", p("out.safetensors")}, p("out.safetensors")},
			speedCase{"decompress --no-sync" + b.label, 0, []string{b.path, "decompress", "-i", p(kvcName(false)), "-o", p("out.safetensors"), "--no-sync"}, p("out.safetensors")},
			speedCase{"compress --seed-scheme" + b.label, 1.8, []string{b.path, "compress", "-i", in, "-o", p("out.kvc"), "--seed-scheme"}, p("out.kvc")},
			speedCase{"decompress (seed-scheme container)" + b.label, 1.8, []string{b.path, "decompress", "-i", p(kvcName(true)), "-o", p("out.safetensors")}, p("out.safetensors")},
		)
		if o.baseline != "" && bi == 1 {
			// --no-sync did not exist before: time the baseline's defaults only.
			cases = slices.DeleteFunc(cases, func(c speedCase) bool {
				return strings.HasSuffix(c.name, b.label) && slices.Contains(c.args, "--no-sync")
			})
		}
	}
	cpOut := filepath.Join(o.dir, "cp-out.safetensors")
	walls := make([][]float64, len(cases))
	ratios := make([][]float64, len(cases))
	cpus := make([][]float64, len(cases))
	var cps, cpCPU []float64
	for range o.rounds {
		for i, c := range cases {
			// cp right before each case: its reference under the same load.
			os.Remove(cpOut)
			cp, err := runCmd([]string{"cp", "--reflink=never", in, cpOut}, false)
			if err != nil {
				return err
			}
			os.Remove(c.out)
			m, err := runCmd(c.args, false)
			if err != nil {
				return err
			}
			cps = append(cps, ms(cp.wall))
			cpCPU = append(cpCPU, ms(cp.cpu))
			cpus[i] = append(cpus[i], ms(m.cpu))
			walls[i] = append(walls[i], ms(m.wall))
			ratios[i] = append(ratios[i], m.wall.Seconds()/cp.wall.Seconds())
		}
	}
	os.Remove(cpOut)
	load, _ := os.ReadFile("/proc/loadavg")
	fmt.Fprintf(w, "cp --reflink=never: median %.1f ms wall [%.1f–%.1f], %.1f ms CPU, over %d runs; load average at the end: %s\n\n",
		median(cps), slices.Min(cps), slices.Max(cps), median(cpCPU), len(cps), strings.Join(strings.Fields(string(load))[:3], " "))
	fmt.Fprintln(w, "| command | median wall ms | wall ÷ the cp before it: median [min–max] | target | median CPU ms (user+sys) |")
	fmt.Fprintln(w, "|---|---|---|---|---|")
	for i, c := range cases {
		verdict := ""
		if c.target > 0 {
			verdict = fmt.Sprintf("≤ %.1f× — ", c.target)
			if median(ratios[i]) <= c.target {
				verdict += "met"
			} else {
				verdict += "NOT met"
			}
		}
		fmt.Fprintf(w, "| %s | %.1f | %.2f× [%.2f–%.2f] | %s | %.1f |\n", c.name, median(walls[i]), median(ratios[i]), slices.Min(ratios[i]), slices.Max(ratios[i]), verdict, median(cpus[i]))
	}
	return nil
}

func kvcName(seed bool) string {
	if seed {
		return "seed.kvc"
	}
	return "default.kvc"
}

// ensureCache writes the synthetic cache unless a file of the right size is there.
func ensureCache(path string, tokens int) (int64, error) {
	want := int64(22*2*4*64*2) * int64(tokens)
	if fi, err := os.Stat(path); err == nil && fi.Size() > want && fi.Size() < want+4096 {
		return fi.Size(), nil
	}
	return writeCache(path, tokens)
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func median(x []float64) float64 {
	s := slices.Clone(x)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
