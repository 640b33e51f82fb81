package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"hash/crc32"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/kv-cache-p2p/validation/pkg/compression"
	"github.com/kv-cache-p2p/validation/pkg/safetensors"
	"github.com/pierrec/lz4/v4"
)

// addressSpaceKiB is the address-space limit (ulimit -v) the acceptance test
// runs the binary under: 3 GB.
const addressSpaceKiB = 3_000_000_000 / 1024

// hangGuard stops a command that runs this long (wall time, on a machine that
// may be shared): it catches hangs, like the FIFO of the audit.
const hangGuard = 5 * time.Minute

// cpuLimit is the processor time each command may use: "within seconds",
// measured in CPU time so that a loaded machine does not make it flaky. The
// audit's quadratic index took 101–141 s (50 s of CPU on this machine for
// 100,000 empty tensors); that case now takes under a second.
const cpuLimit = 45 * time.Second

// buildBinary builds kv-compress from this package into a temporary folder,
// with the environment's GOEXPERIMENT, so the test runs the real binary.
func buildBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "kv-compress")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// runLimited runs the binary under the 3 GB address-space limit and checks
// what every command owes its caller whatever the input: an allowed exit
// code, exactly one JSON object on stdout, no panic or runtime fatal error.
func runLimited(t *testing.T, bin string, allowed []int, args ...string) (int, map[string]any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), hangGuard)
	defer cancel()
	cmd := exec.CommandContext(ctx, "sh", append([]string{"-c", fmt.Sprintf(`ulimit -v %d && exec "$@"`, addressSpaceKiB), "sh", bin}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err := cmd.Run()
	took := time.Since(start)
	code := cmd.ProcessState.ExitCode()
	if ctx.Err() != nil {
		t.Fatalf("%v: still running after %v", args, hangGuard)
	}
	if err != nil && code < 0 {
		t.Fatalf("%v: %v", args, err)
	}
	cpu := cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
	t.Logf("%s: exit %d in %v wall, %v CPU", args[0], code, took.Round(time.Millisecond), cpu.Round(time.Millisecond))
	if cpu > cpuLimit {
		t.Errorf("%v: %v of CPU, more than %v", args, cpu, cpuLimit)
	}
	for _, bad := range []string{"panic", "fatal error", "goroutine ", "out of memory"} {
		if strings.Contains(stderr.String(), bad) {
			t.Fatalf("%v: stderr shows %q:\n%.2000s", args, bad, stderr.String())
		}
	}
	var doc map[string]any
	dec := json.NewDecoder(&stdout)
	if err := dec.Decode(&doc); err != nil {
		t.Fatalf("%v: stdout is not a JSON object (%v): %.300q", args, err, stdout.String())
	}
	if dec.More() {
		t.Fatalf("%v: stdout holds more than one JSON value", args)
	}
	ok := false
	for _, c := range allowed {
		ok = ok || c == code
	}
	if !ok {
		t.Fatalf("%v: exit %d, want one of %v; stderr: %.500s", args, code, allowed, stderr.String())
	}
	if code != 0 && (doc["error"] == nil || strings.Count(strings.TrimSpace(stderr.String()), "\n") != 0) {
		t.Fatalf("%v: exit %d without an error object and a one-line message: %v / %q", args, code, doc, stderr.String())
	}
	return code, doc
}

// writeSafetensors writes a file from a literal header and data.
func writeSafetensors(t *testing.T, path, header string, data []byte) {
	t.Helper()
	var b bytes.Buffer
	binary.Write(&b, binary.LittleEndian, uint64(len(header)))
	b.WriteString(header)
	b.Write(data)
	if err := os.WriteFile(path, b.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}

func crc(b []byte) string {
	return fmt.Sprintf("%08x", crc32.Checksum(b, crc32.MakeTable(crc32.Castagnoli)))
}

// hostilePayload is one payload of a crafted container.
type hostilePayload struct {
	name, encoding string
	raw            int64
	data           []byte
}

// writeContainer writes a container with right checksums whose index entries
// (JSON with %s for each payload description) claim what the test wants.
func writeContainer(t *testing.T, path string, entries []string, payloads [][]hostilePayload) {
	t.Helper()
	var index []string
	var tensors []safetensors.Tensor
	for i, e := range entries {
		var descs []any
		for _, p := range payloads[i] {
			descs = append(descs, fmt.Sprintf(`{"tensor":%q,"encoding":%q,"raw_bytes":%d,"crc32c":%q}`, p.name, p.encoding, p.raw, crc(p.data)))
			tensors = append(tensors, safetensors.Tensor{Name: p.name, DType: safetensors.U8, Shape: []int64{int64(len(p.data))}, Data: p.data})
		}
		index = append(index, fmt.Sprintf(e, descs...))
	}
	codec, _ := json.Marshal(compression.DefaultCodec())
	tj := "[" + strings.Join(index, ",") + "]"
	h := crc32.New(crc32.MakeTable(crc32.Castagnoli))
	h.Write(codec)
	h.Write([]byte{0})
	h.Write([]byte(tj))
	h.Write([]byte{0})
	// The codec record is this build's default, so the version is the one it writes.
	md := map[string]string{"format": "kv-compress", "format_version": fmt.Sprint(compression.FormatVersion), "codec": string(codec), "tensors": tj,
		"index_crc32c": fmt.Sprintf("%08x", h.Sum32())}
	if err := safetensors.WriteFile(path, tensors, md); err != nil {
		t.Fatal(err)
	}
}

func lz4Zeros(t *testing.T, n int) []byte {
	t.Helper()
	var c lz4.CompressorCCompat
	buf := make([]byte, lz4.CompressBlockBound(n))
	k, err := c.CompressBlock(make([]byte, n), buf)
	if err != nil || k == 0 {
		t.Fatalf("lz4 of %d zeros: %v", n, err)
	}
	return buf[:k]
}

func stored(name, dtype, shape string) string {
	return `{"name":"` + name + `","dtype":"` + dtype + `","shape":` + shape + `,"mode":"stored","raw":%s}`
}

// TestHostileInputsUnderMemoryLimit is the acceptance test of issue 13: every
// case of the hostile-input audit, run through the real binary under a 3 GB
// address-space limit, is refused with exit 3 or accepted with a valid
// output, within the hang guard, with no panic and one JSON object on stdout.
func TestHostileInputsUnderMemoryLimit(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("ulimit -v and /proc are Linux-specific")
	}
	if testing.Short() {
		t.Skip("builds the binary and writes files of ~100 MB")
	}
	bin := buildBinary(t)
	dir := t.TempDir()
	p := func(name string) string { return filepath.Join(dir, name) }
	one := []byte{7}

	// Containers whose index lies (checksums right).
	for _, k := range []int{31, 34, 40, 50} {
		n := int64(1) << k
		writeContainer(t, p(fmt.Sprintf("claims%d.kvc", k)), []string{stored("x", "U8", fmt.Sprintf("[%d]", n))}, [][]hostilePayload{{{"x.raw", "stored", n, one}}})
	}
	writeContainer(t, p("wrap.kvc"), []string{stored("x", "U8", "[2305843009213693952]")}, [][]hostilePayload{{{"x.raw", "stored", 0, nil}}})
	bomb := func(name string, out int64) { // 2-bit codes decoded to F64, LZ4 at its best ratio
		elems := out / 8
		writeContainer(t, p(name), []string{fmt.Sprintf(`{"name":"x","dtype":"F64","shape":[%d,65536],"mode":"int2","codes":%%s,"scales":%%s}`, elems/65536)},
			[][]hostilePayload{{{"x.codes", "lz4", elems / 4, lz4Zeros(t, int(elems/4))}, {"x.scales", "lz4", elems / 32, lz4Zeros(t, int(elems/32))}}})
	}
	bomb("bomb1g.kvc", 1<<30)
	bomb("bomb8g.kvc", 8<<30)
	var entries []string
	var payloads [][]hostilePayload
	for i := range 100000 {
		entries = append(entries, stored(fmt.Sprintf("t%d", i), "F16", "[0,64]"))
		payloads = append(payloads, []hostilePayload{{fmt.Sprintf("t%d.raw", i), "stored", 0, nil}})
	}
	writeContainer(t, p("empty100k.kvc"), entries, payloads)

	// Plain safetensors files.
	var hb strings.Builder
	hb.WriteString("{")
	for i := range 1_700_000 {
		if i > 0 {
			hb.WriteByte(',')
		}
		fmt.Fprintf(&hb, `"%x":{"dtype":"F16","shape":[0],"data_offsets":[0,0]}`, i)
	}
	hb.WriteString("}")
	writeSafetensors(t, p("zero1m7.safetensors"), hb.String(), nil)
	hb.Reset()
	hb.WriteString(`{"__metadata__":{`)
	for i := range 7_100_000 {
		if i > 0 {
			hb.WriteByte(',')
		}
		fmt.Fprintf(&hb, `"%x":"v"`, i)
	}
	hb.WriteString(`}}`)
	writeSafetensors(t, p("meta7m.safetensors"), hb.String(), nil)
	hb.Reset()
	for i, dup := range []string{
		`{"a":{"dtype":"U8","dtype":"F16","shape":[2],"data_offsets":[0,2]}}`,
		`{"a":{"dtype":"U8","shape":[4],"shape":[2],"data_offsets":[0,2]}}`,
		`{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,4],"data_offsets":[0,2]}}`,
	} {
		writeSafetensors(t, p(fmt.Sprintf("dup%d.safetensors", i)), dup, []byte{1, 2})
	}
	limit := func(dt safetensors.DType, sink bool) string { // a float16 cache at 65504, or 3e38 in a float32 sink
		x := make([]float32, 2*8*64)
		for i := range x {
			x[i] = float32(i%17) - 8
		}
		if sink {
			x[0], x[1] = 3e38, -3e38
		} else {
			for i := range x {
				x[i] = 65504 * float32(1-2*(i%2))
			}
		}
		data := make([]byte, len(x)*dt.Bits()/8)
		safetensors.EncodeFloat32(dt, x, data)
		path := p("limit_" + string(dt) + ".safetensors")
		if err := safetensors.WriteFile(path, []safetensors.Tensor{{Name: "layer_0_key", DType: dt, Shape: []int64{1, 2, 8, 64}, Data: data}}, nil); err != nil {
			t.Fatal(err)
		}
		return path
	}
	f16, f32 := limit(safetensors.F16, false), limit(safetensors.F32, true)

	refused := []int{3}
	for _, c := range []struct {
		name    string
		allowed []int
		args    []string
	}{
		{"633-byte panic: 1 byte claims 2^50", refused, []string{"decompress", "-i", p("claims50.kvc"), "-o", p("o50")}},
		{"1 byte claims 2^40", refused, []string{"decompress", "-i", p("claims40.kvc"), "-o", p("o40")}},
		{"1 byte claims 2^34", refused, []string{"decompress", "-i", p("claims34.kvc"), "-o", p("o34")}},
		{"1 byte claims 2^31", refused, []string{"decompress", "-i", p("claims31.kvc"), "-o", p("o31")}},
		{"inspect 2^50 claim", refused, []string{"inspect", "-i", p("claims50.kvc")}},
		{"[2^61] U8 wraps to 0 bytes", refused, []string{"decompress", "-i", p("wrap.kvc"), "-o", p("owrap")}},
		{"LZ4 bomb to 1 GiB", []int{0, 3}, []string{"decompress", "-i", p("bomb1g.kvc"), "-o", p("obomb1")}},
		{"LZ4 bomb to 8 GiB", refused, []string{"decompress", "-i", p("bomb8g.kvc"), "-o", p("obomb8")}},
		{"inspect LZ4 bomb", refused, []string{"inspect", "-i", p("bomb8g.kvc")}},
		{"inspect --verify LZ4 bomb", refused, []string{"inspect", "--verify", "-i", p("bomb8g.kvc")}},
		{"100,000 empty tensors", []int{0}, []string{"decompress", "-i", p("empty100k.kvc"), "-o", p("o100k")}},
		{"inspect 100,000 empty tensors", []int{0}, []string{"inspect", "-i", p("empty100k.kvc")}},
		{"compress 1.7 M zero-size tensors", refused, []string{"compress", "-i", p("zero1m7.safetensors"), "-o", p("ozero")}},
		{"inspect 1.7 M zero-size tensors", []int{0}, []string{"inspect", "-i", p("zero1m7.safetensors")}},
		{"inspect 7.1 M metadata keys", []int{0}, []string{"inspect", "-i", p("meta7m.safetensors")}},
		{"compress 7.1 M metadata keys", []int{0, 3}, []string{"compress", "-i", p("meta7m.safetensors"), "-o", p("ometa")}},
		{"duplicate dtype", refused, []string{"inspect", "-i", p("dup0.safetensors")}},
		{"duplicate shape", refused, []string{"compress", "-i", p("dup1.safetensors"), "-o", p("odup1")}},
		{"duplicate data_offsets", refused, []string{"inspect", "-i", p("dup2.safetensors")}},
		{"float16 at 65504", []int{0}, []string{"compress", "--rotate", "none", "-i", f16, "-o", p("f16.kvc")}},
		{"float16 at 65504, strict", []int{0, 4}, []string{"metrics", "--strict", "--rotate", "none", "-i", f16}},
		{"3e38 in a float32 sink", []int{0}, []string{"compress", "-i", f32, "-o", p("f32.kvc")}},
		{"--workers 100000", []int{0}, []string{"compress", "--workers", "100000", "-i", f16, "--rotate", "none", "-o", p("w.kvc")}},
	} {
		t.Run(c.name, func(t *testing.T) {
			code, doc := runLimited(t, bin, c.allowed, c.args...)
			out := ""
			for i, a := range c.args {
				if a == "-o" {
					out = c.args[i+1]
				}
			}
			if code != 0 {
				if _, err := os.Stat(out); out != "" && err == nil {
					t.Fatalf("a refused command left %s behind", out)
				}
				return
			}
			for _, k := range []string{"rmse", "snr_db", "cosine_similarity", "max_error"} {
				if v, ok := doc[k]; ok && v != nil {
					if f, isNum := v.(float64); !isNum || math.IsInf(f, 0) || math.IsNaN(f) {
						t.Fatalf("%s = %v", k, v)
					}
				}
			}
			if out == "" {
				return
			}
			f, err := safetensors.ReadFile(out)
			if err != nil {
				t.Fatalf("accepted, but the output does not read back: %v", err)
			}
			if compression.IsContainer(f) { // a container must restore to finite values
				runLimited(t, bin, []int{0}, "inspect", "--verify", "-i", out)
				runLimited(t, bin, []int{0}, "decompress", "-i", out, "-o", out+".restored")
				r, err := safetensors.ReadFile(out + ".restored")
				if err != nil {
					t.Fatal(err)
				}
				for i := range r.Tensors {
					tn := &r.Tensors[i]
					if !tn.DType.IsFloat() {
						continue
					}
					x := make([]float32, tn.NumElements())
					safetensors.DecodeFloat32(tn.DType, tn.Data, x)
					for j, v := range x {
						if math.IsInf(float64(v), 0) || math.IsNaN(float64(v)) {
							t.Fatalf("%s element %d restored as %v", tn.Name, j, v)
						}
					}
				}
			}
		})
	}
}

// TestCLIBudgetAndVerify: the flags of issue 13 at the command line.
func TestCLIBudgetAndVerify(t *testing.T) {
	dir := t.TempDir()
	in := filepath.Join(dir, "cache.safetensors")
	copyFile(t, golden+"cache_f16.safetensors", in)
	kvc := filepath.Join(dir, "cache.kvc")
	if code, _, errs := runCLI(t, "compress", "-i", in, "-o", kvc); code != 0 {
		t.Fatalf("compress: %d %s", code, errs)
	}
	b, _ := os.ReadFile(kvc)
	flipped := filepath.Join(dir, "flipped.kvc")
	b[len(b)-3] ^= 0x10 // a payload byte: the header and index stay valid
	os.WriteFile(flipped, b, 0o644)
	tests := []struct {
		name   string
		args   []string
		want   int
		stderr string
	}{
		{"inspect checks payload CRCs", []string{"inspect", "-i", flipped}, 3, "crc32c"},
		{"inspect --verify", []string{"inspect", "--verify", "-i", kvc}, 0, ""},
		{"budget too small", []string{"decompress", "--max-memory", "1KiB", "-i", kvc, "-o", filepath.Join(dir, "r")}, 3, "budget"},
		{"inspect says what decompress would refuse", []string{"inspect", "--max-memory", "1KiB", "-i", kvc}, 3, "budget"},
		{"budget too small for compress", []string{"compress", "--max-memory", "1KiB", "-i", in, "-o", filepath.Join(dir, "c")}, 3, "budget"},
		{"budget in plain bytes", []string{"decompress", "--max-memory", "1073741824", "-i", kvc, "-o", filepath.Join(dir, "r2")}, 0, ""},
		{"bad budget", []string{"decompress", "--max-memory", "lots", "-i", kvc, "-o", filepath.Join(dir, "r3")}, 2, "max-memory"},
		{"workers capped", []string{"decompress", "--workers", "1000000", "-i", kvc, "-o", filepath.Join(dir, "r4")}, 0, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			code, doc, errs := runCLI(t, tc.args...)
			if code != tc.want || !strings.Contains(errs, tc.stderr) {
				t.Fatalf("exit %d (want %d), stderr %q (want %q), stdout %v", code, tc.want, errs, tc.stderr, doc)
			}
		})
	}
}
