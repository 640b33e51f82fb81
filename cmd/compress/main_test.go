package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const golden = "../../pkg/compression/testdata/golden/"

func runCLI(t *testing.T, args ...string) (int, map[string]any, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(args, &out, &errb)
	var doc map[string]any
	if err := json.Unmarshal(out.Bytes(), &doc); err != nil {
		t.Fatalf("stdout is not one JSON object: %q (%v)", out.String(), err)
	}
	if strings.Count(strings.TrimSpace(out.String()), "\n") != 0 {
		t.Fatalf("stdout holds more than one line: %q", out.String())
	}
	return code, doc, errb.String()
}

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestCLI(t *testing.T) {
	dir := t.TempDir()
	in := filepath.Join(dir, "cache.safetensors")
	copyFile(t, golden+"cache_f16.safetensors", in)
	garbage := filepath.Join(dir, "garbage.safetensors")
	os.WriteFile(garbage, []byte("this is not a safetensors file at all"), 0o644)
	kvc := filepath.Join(dir, "cache.kvc")
	restored := filepath.Join(dir, "restored.safetensors")

	tests := []struct {
		name     string
		args     []string
		wantCode int
		wantKeys []string
		noFile   string // must not exist afterwards
		stderr   string // substring of stderr
	}{
		{"version", []string{"version"}, 0, []string{"version", "format_version"}, "", ""},
		{"compress", []string{"compress", "-i", in, "-o", kvc}, 0,
			[]string{"compression_ratio", "original_size_bytes", "compressed_size_bytes", "rmse", "snr_db", "cosine_similarity",
				"max_error", "quality_level", "processing_time_ms", "passed", "violations", "schema_version", "codec", "tensors"}, "", ""},
		{"decompress", []string{"decompress", "-i", kvc, "-o", restored}, 0, []string{"tensors", "codec"}, "", ""},
		{"inspect container", []string{"inspect", "-i", kvc}, 0, []string{"codec", "tensors", "kind"}, "", ""},
		{"inspect plain", []string{"inspect", "-i", in}, 0, []string{"tensors", "kind"}, "", ""},
		{"metrics writes nothing", []string{"metrics", "-i", in, "--group-size", "32"}, 0, []string{"rmse"}, "", ""},
		{"strict gate", []string{"metrics", "-i", in, "--strict", "--rotate", "none", "--key-axis", "token", "--sink", "0"}, 4, []string{"violations"}, "", "quality gate"},
		{"unknown flag", []string{"compress", "--level", "9"}, 2, []string{"error"}, "", "flag provided but not defined"},
		{"no subcommand", []string{}, 2, []string{"error"}, "", "missing subcommand"},
		{"unknown subcommand", []string{"squash"}, 2, []string{"error"}, "", "unknown subcommand"},
		{"missing output", []string{"compress", "-i", in}, 2, []string{"error"}, "", "needs -o"},
		{"bad group size", []string{"compress", "-i", in, "-o", filepath.Join(dir, "g.kvc"), "--group-size", "48"}, 2, []string{"error"}, filepath.Join(dir, "g.kvc"), "[32 64 128], got 48"},
		{"bad sparsity", []string{"compress", "-i", in, "-o", filepath.Join(dir, "s.kvc"), "--sparsity", "1"}, 2, []string{"error"}, filepath.Join(dir, "s.kvc"), "[0, 1), got 1"},
		{"output is input", []string{"compress", "-i", in, "-o", in}, 2, []string{"error"}, "", "output path is the input path"},
		{"garbage input", []string{"compress", "-i", garbage, "-o", filepath.Join(dir, "x.kvc")}, 3, []string{"error"}, filepath.Join(dir, "x.kvc"), garbage},
		{"missing input", []string{"compress", "-i", filepath.Join(dir, "nope"), "-o", filepath.Join(dir, "y.kvc")}, 1, []string{"error"}, filepath.Join(dir, "y.kvc"), "no such file"},
		{"decompress plain file", []string{"decompress", "-i", in, "-o", filepath.Join(dir, "z.safetensors")}, 3, []string{"error"}, filepath.Join(dir, "z.safetensors"), "not a kv-compress container"},
		{"compress a container", []string{"compress", "-i", kvc, "-o", filepath.Join(dir, "w.kvc")}, 3, []string{"error"}, filepath.Join(dir, "w.kvc"), "already"},
		{"group does not divide", []string{"compress", "-i", golden + "ties_f32.safetensors", "-o", filepath.Join(dir, "t.kvc"), "--group-size", "128"}, 3, []string{"error"}, filepath.Join(dir, "t.kvc"), `tensor "ties"`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before, _ := os.ReadFile(in)
			code, doc, stderr := runCLI(t, tc.args...)
			if code != tc.wantCode {
				t.Fatalf("exit %d, want %d (stderr %q)", code, tc.wantCode, stderr)
			}
			for _, k := range tc.wantKeys {
				if _, ok := doc[k]; !ok {
					t.Errorf("JSON lacks %q: %v", k, doc)
				}
			}
			if tc.stderr != "" && !strings.Contains(stderr, tc.stderr) {
				t.Errorf("stderr %q does not contain %q", stderr, tc.stderr)
			}
			if code != 0 && strings.Count(strings.TrimSpace(stderr), "\n") != 0 {
				t.Errorf("error is not one line: %q", stderr)
			}
			if tc.noFile != "" {
				if _, err := os.Stat(tc.noFile); !os.IsNotExist(err) {
					t.Errorf("%s exists after a failure", tc.noFile)
				}
			}
			after, _ := os.ReadFile(in)
			if !bytes.Equal(before, after) {
				t.Fatal("the input file changed")
			}
			entries, _ := os.ReadDir(dir)
			for _, e := range entries {
				if strings.Contains(e.Name(), ".tmp-") {
					t.Errorf("temporary file left behind: %s", e.Name())
				}
			}
		})
	}
	// The compress report's sizes are real file sizes.
	_, doc, _ := runCLI(t, "compress", "-i", in, "-o", kvc)
	st, _ := os.Stat(kvc)
	if int64(doc["compressed_size_bytes"].(float64)) != st.Size() {
		t.Errorf("compressed_size_bytes %v, file has %d bytes", doc["compressed_size_bytes"], st.Size())
	}
	si, _ := os.Stat(in)
	if int64(doc["original_size_bytes"].(float64)) != si.Size() {
		t.Errorf("original_size_bytes %v, file has %d bytes", doc["original_size_bytes"], si.Size())
	}
	// An F16 input already is its float16 size; an F32 one would be about half as big.
	if doc["fp16_size_bytes"] != doc["original_size_bytes"] || doc["disk_ratio_vs_fp16"] != doc["compression_ratio"] {
		t.Errorf("F16 input: fp16_size_bytes %v, disk ratio %v", doc["fp16_size_bytes"], doc["disk_ratio_vs_fp16"])
	}
	_, doc32, _ := runCLI(t, "metrics", "-i", golden+"cache_f32.safetensors")
	f32Data := 4 * 2 * 3 * 64 * 4 // four tensors of [1, 2, 3, 64] float32
	if got, want := doc32["fp16_size_bytes"].(float64), doc32["original_size_bytes"].(float64)-float64(f32Data)/2; got != want {
		t.Errorf("F32 input: fp16_size_bytes %v, want %v", got, want)
	}
}

func TestSeedSchemeFlag(t *testing.T) {
	in := filepath.Join("..", "..", "pkg", "compression", "testdata", "golden", "ties_f32.safetensors")
	for _, c := range []struct {
		name string
		args []string
		want map[string]any
	}{
		{"defaults", nil, map[string]any{"scheme": "sym", "rotate": "hadamard", "key_axis": "channel", "sink": 1.0}},
		{"seed", []string{"--seed-scheme"}, map[string]any{"scheme": "sym", "rotate": "none", "key_axis": "token", "sink": 0.0}},
		{"seed with an explicit flag", []string{"--seed-scheme", "--sink", "2"}, map[string]any{"rotate": "none", "key_axis": "token", "sink": 2.0}},
	} {
		t.Run(c.name, func(t *testing.T) {
			code, doc, stderr := runCLI(t, append([]string{"metrics", "-i", in, "--group-size", "32"}, c.args...)...)
			if code != 0 {
				t.Fatalf("exit %d: %s %v", code, stderr, doc["error"])
			}
			codec, _ := doc["codec"].(map[string]any)
			for k, v := range c.want {
				if codec[k] != v {
					t.Errorf("codec %s = %v, want %v", k, codec[k], v)
				}
			}
		})
	}
}

func TestPresetFlag(t *testing.T) {
	dir := t.TempDir()
	in := golden + "long_f16.safetensors"
	file := filepath.Join(dir, "keys.json")
	os.WriteFile(file, []byte(`{"name":"long-keys","keys":{"scheme":"asym","axis":"channel","group_size":256}}`), 0o644)
	bad := filepath.Join(dir, "bad.json")
	os.WriteFile(bad, []byte(`{"values":{"bits":5}}`), 0o644)
	for _, c := range []struct {
		name     string
		args     []string
		wantCode int
		preset   string
		modified []any
		codec    map[string]any
		stderr   string
	}{
		{"no preset is the default", nil, 0, "default", []any{}, map[string]any{"entropy": "auto", "rotate": "hadamard"}, ""},
		{"seed", []string{"--preset", "seed"}, 0, "seed", []any{}, map[string]any{"entropy": "lz4", "rotate": "none", "key_axis": "token"}, ""},
		{"seed-scheme alias", []string{"--seed-scheme"}, 0, "seed", []any{}, map[string]any{"entropy": "lz4"}, ""},
		{"modified by a flag", []string{"--preset", "compact", "--bits", "4"}, 0, "compact", []any{"--bits"}, map[string]any{"bits": 4.0}, ""},
		{"a flag repeating the preset's value", []string{"--preset", "seed", "--group-size", "64", "--sparsity", "0"}, 0, "seed", []any{}, map[string]any{"group_size": 64.0}, ""},
		{"file", []string{"--preset", file}, 0, "long-keys", []any{}, map[string]any{"preset": "long-keys"}, ""},
		{"unknown name", []string{"--preset", "tiny"}, 2, "", nil, nil, "neither a built-in preset"},
		{"invalid file", []string{"--preset", bad}, 2, "", nil, nil, "values.bits"},
		{"conflicting alias", []string{"--seed-scheme", "--preset", "default"}, 2, "", nil, nil, "conflicts"},
	} {
		t.Run(c.name, func(t *testing.T) {
			code, doc, stderr := runCLI(t, append([]string{"metrics", "-i", in}, c.args...)...)
			if code != c.wantCode {
				t.Fatalf("exit %d, want %d: %s", code, c.wantCode, stderr)
			}
			if c.wantCode != 0 {
				if !strings.Contains(stderr, c.stderr) || strings.Count(strings.TrimSpace(stderr), "\n") != 0 {
					t.Fatalf("stderr %q, want one line containing %q", stderr, c.stderr)
				}
				return
			}
			if doc["preset"] != c.preset {
				t.Errorf("preset %v, want %v", doc["preset"], c.preset)
			}
			if got, _ := json.Marshal(doc["preset_modified_by"]); string(got) != func() string { b, _ := json.Marshal(c.modified); return string(b) }() {
				t.Errorf("preset_modified_by %s, want %v", got, c.modified)
			}
			codec, _ := doc["codec"].(map[string]any)
			for k, v := range c.codec {
				if codec[k] != v {
					t.Errorf("codec %s = %v, want %v", k, codec[k], v)
				}
			}
			parts, _ := doc["bytes_by_part"].(map[string]any)
			sum := 0.0
			for _, v := range parts {
				sum += v.(float64)
			}
			if sum != doc["compressed_size_bytes"] {
				t.Errorf("bytes_by_part %v sum to %v, file %v", parts, sum, doc["compressed_size_bytes"])
			}
		})
	}
	_, doc, _ := runCLI(t, "version")
	presets, _ := doc["presets"].([]any)
	var names []string
	for _, p := range presets {
		names = append(names, p.(map[string]any)["name"].(string))
	}
	if strings.Join(names, ",") != "seed,default,compact,near-lossless" {
		t.Errorf("version lists presets %v", names)
	}
}

// TestExactMetricsFlag: --exact-metrics changes how the error of rotated
// tensors is measured (original basis), never the container's bytes; RMSE
// stays within the bound docs/cli.md gives, the largest error is the
// element-wise one, at least the rotated-basis one.
func TestExactMetricsFlag(t *testing.T) {
	dir := t.TempDir()
	in := filepath.Join(dir, "cache.safetensors")
	copyFile(t, golden+"cache_f16.safetensors", in)
	fast, exact := filepath.Join(dir, "fast.kvc"), filepath.Join(dir, "exact.kvc")
	code, a, stderr := runCLI(t, "compress", "-i", in, "-o", fast)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	code, b, stderr := runCLI(t, "compress", "--exact-metrics", "-i", in, "-o", exact)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	fa, _ := os.ReadFile(fast)
	fb, _ := os.ReadFile(exact)
	if !bytes.Equal(fa, fb) {
		t.Fatal("--exact-metrics changed the container")
	}
	ra, rb := a["rmse"].(float64), b["rmse"].(float64)
	if d := (ra - rb) / rb; d > 0.01 || d < -0.01 {
		t.Errorf("rmse %g in the rotated basis, %g in the original one", ra, rb)
	}
	if ma, mb := a["max_error"].(float64), b["max_error"].(float64); !(ma > 0 && ma <= mb) {
		t.Errorf("max_error %g in the rotated basis, %g element-wise", ma, mb)
	}
}
