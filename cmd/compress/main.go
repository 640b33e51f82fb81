// Command kv-compress compresses safetensors KV caches with per-group
// quantization and an entropy stage, restores them, and reports quality metrics.
//
// Usage:
//
//	kv-compress compress   -i IN -o OUT [--preset default|NAME|FILE] [--group-size 64] [--bits 4] ... [--strict] [--no-sync]
//	kv-compress decompress -i IN -o OUT [--no-sync]
//	kv-compress metrics    -i IN [--group-size 64] [--sparsity 0] [--strict]
//	kv-compress inspect    -i FILE [--verify]
//	kv-compress version
//
// stdout carries exactly one JSON object (the report, or {"error": ...} on
// failure); diagnostics go to stderr. Exit codes: 0 success, 1 I/O or internal
// error, 2 usage error, 3 invalid input file, 4 quality gate failed (--strict).
// See docs/cli.md.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"

	"github.com/kv-cache-p2p/validation/pkg/atomicfile"
	"github.com/kv-cache-p2p/validation/pkg/compression"
	"github.com/kv-cache-p2p/validation/pkg/mapfile"
	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// Exit codes.
const (
	exitOK      = 0
	exitFailure = 1
	exitUsage   = 2
	exitInput   = 3
	exitQuality = 4
)

var errUsage = errors.New("usage")

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

type options struct {
	in, out string
	cfg     compression.Config
	verbose bool
	strict  bool
	pretty  bool
	verify  bool
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		return fail(stdout, stderr, "", fmt.Errorf("%w: missing subcommand (run kv-compress --help)", errUsage))
	}
	cmd := args[0]
	if cmd == "-h" || cmd == "--help" || cmd == "help" {
		usage(stderr)
		return exitOK
	}
	fs := flag.NewFlagSet(cmd, flag.ContinueOnError)
	fs.SetOutput(io.Discard) // parse errors are reported as one line by fail
	o := options{cfg: compression.DefaultConfig()}
	fs.StringVar(&o.in, "i", "", "input file")
	fs.StringVar(&o.in, "input", "", "input file (same as -i)")
	fs.StringVar(&o.out, "o", "", "output file")
	fs.StringVar(&o.out, "output", "", "output file (same as -o)")
	fs.IntVar(&o.cfg.GroupSize, "group-size", compression.DefaultGroupSize, "quantization group size along the last axis: 32, 64 or 128")
	fs.Float64Var(&o.cfg.Sparsity, "sparsity", compression.DefaultSparsity, "fraction in [0, 1) of smallest-magnitude elements zeroed before quantizing")
	fs.StringVar(&o.cfg.Scheme, "scheme", compression.DefaultScheme, "quantization scheme: sym (scale only), asym (float16 minimum and scale) or nf (non-uniform Gaussian levels, 2 to 4 bits)")
	fs.StringVar(&o.cfg.Rotate, "rotate", compression.DefaultRotate, "rotation along the last axis before quantizing: none or hadamard")
	fs.StringVar(&o.cfg.KeyAxis, "key-axis", compression.DefaultKeyAxis, "grouping of key tensors (layer_N_key): token (along head_dim) or channel (along the sequence)")
	fs.IntVar(&o.cfg.Sink, "sink", compression.DefaultSink, "leading sequence positions of every tensor kept exact")
	fs.IntVar(&o.cfg.Bits, "bits", compression.DefaultBits, "code width: 2, 3, 4 or 8")
	fs.IntVar(&o.cfg.KeyBits, "key-bits", 0, "code width of key tensors (0: --bits)")
	fs.IntVar(&o.cfg.ValueBits, "value-bits", 0, "code width of value tensors (0: --bits)")
	fs.StringVar(&o.cfg.Entropy, "entropy", compression.DefaultEntropy, "entropy stage policy: auto (measure huff0, zstd, lz4 per payload), lz4 or none")
	preset := fs.String("preset", compression.PresetDefault, "codec preset: a built-in name ("+strings.Join(compression.PresetNames(), ", ")+") or a JSON preset file; codec flags given explicitly still apply")
	seed := fs.Bool("seed-scheme", false, "same as --preset seed: sym, G = 64, no rotation, key axis token, no sink, LZ4")
	fs.IntVar(&o.cfg.Workers, "workers", 0, "tensors processed in parallel (0: one per CPU; at most 4 per CPU)")
	fs.Func("max-memory", "memory budget, e.g. 2GiB or 500MB (default: 3/4 of the machine's memory or cgroup limit, less under a ulimit -v)", func(v string) error {
		n, err := compression.ParseSize(v)
		o.cfg.MaxMemory = n
		return err
	})
	fs.BoolVar(&o.verify, "verify", false, "inspect: also decode every tensor, as decompress would, without writing it")
	fs.BoolVar(&o.cfg.ExactMetrics, "exact-metrics", false, "measure the error of rotated tensors after the inverse rotation and the rounding to the stored dtype (slower; by default it is measured in the rotated basis)")
	fs.BoolVar(&o.cfg.NoSync, "no-sync", false, "skip the fsync before the output is renamed into place (scratch folders only: after a crash the output may be incomplete)")
	fs.BoolVar(&o.verbose, "verbose", false, "print per-tensor diagnostics to stderr")
	fs.BoolVar(&o.verbose, "v", false, "same as --verbose")
	fs.BoolVar(&o.strict, "strict", false, "exit 4 when the quality thresholds are violated")
	fs.BoolVar(&o.pretty, "pretty", false, "indent the JSON output")
	if err := fs.Parse(args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			usage(stderr)
			fs.SetOutput(stderr)
			fs.PrintDefaults()
			return exitOK
		}
		return fail(stdout, stderr, cmd, fmt.Errorf("%w: %v", errUsage, err))
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if *seed {
		if set["preset"] && *preset != compression.PresetSeed {
			return fail(stdout, stderr, cmd, fmt.Errorf("%w: --seed-scheme is --preset seed; it conflicts with --preset %s", errUsage, *preset))
		}
		*preset = compression.PresetSeed
	}
	var modifiedBy []string
	if cmd == "compress" || cmd == "metrics" {
		p, err := compression.LoadPreset(*preset)
		if err != nil {
			return fail(stdout, stderr, cmd, err)
		}
		o.cfg, modifiedBy = p.ApplyFlags(o.cfg, func(name string) bool { return set[name] })
	}
	if fs.NArg() > 0 {
		return fail(stdout, stderr, cmd, fmt.Errorf("%w: unexpected argument %q", errUsage, fs.Arg(0)))
	}
	need := func(in, out bool) error {
		if in && o.in == "" {
			return fmt.Errorf("%w: %s needs -i INPUT", errUsage, cmd)
		}
		if out && o.out == "" {
			return fmt.Errorf("%w: %s needs -o OUTPUT", errUsage, cmd)
		}
		return nil
	}

	var report any
	var err error
	code := exitOK
	switch cmd {
	case "compress", "metrics":
		if err = need(true, cmd == "compress"); err != nil {
			break
		}
		if cmd == "metrics" {
			o.out = ""
		}
		var r *compression.Report
		if r, err = compression.CompressFile(o.in, o.out, o.cfg); err == nil {
			r.Command = cmd
			r.PresetModifiedBy = append(r.PresetModifiedBy, modifiedBy...)
			if o.verbose {
				for _, t := range r.Tensors {
					fmt.Fprintf(stderr, "%-32s %-5s %-8s %v rmse=%.6f snr=%.2fdB cos=%.6f\n", t.Name, t.DType, t.Mode, t.Shape, t.RMSE, t.SNRdB, t.CosineSimilarity)
				}
				fmt.Fprintf(stderr, "%s: %d -> %d bytes (%.2fx) in %.1f ms\n", o.in, r.OriginalSizeBytes, r.CompressedSizeBytes, r.CompressionRatio, r.ProcessingTimeMS)
			}
			if o.strict && !r.Passed {
				fmt.Fprintf(stderr, "kv-compress: %s: quality gate failed: %s\n", o.in, strings.Join(r.Violations, "; "))
				code = exitQuality
			}
			report = r
		}
	case "decompress":
		if err = need(true, true); err != nil {
			break
		}
		var r *compression.DecompressReport
		if r, err = compression.DecompressFile(o.in, o.out, o.cfg); err == nil {
			if o.verbose {
				fmt.Fprintf(stderr, "%s: %d -> %d bytes, %d tensors in %.1f ms\n", o.in, r.CompressedSizeBytes, r.OriginalSizeBytes, len(r.Tensors), r.ProcessingTimeMS)
			}
			report = r
		}
	case "inspect":
		if err = need(true, false); err == nil {
			report, err = compression.Inspect(o.in, compression.InspectOptions{Verify: o.verify, Workers: o.cfg.Workers, MaxMemory: o.cfg.MaxMemory})
		}
	case "version":
		report = map[string]any{
			"schema_version": compression.SchemaVersion, "command": "version", "version": version,
			"format": compression.FormatName, "format_version": compression.FormatVersion,
			"go_version": runtime.Version(), "group_sizes": compression.GroupSizes,
			"default_codec": compression.DefaultCodec(), "encoder": compression.Encoder(),
			"presets": compression.PresetList(), "readable_format_versions": compression.ReadableVersions,
		}
	default:
		err = fmt.Errorf("%w: unknown subcommand %q (want compress, decompress, metrics, inspect or version)", errUsage, cmd)
	}
	if err != nil {
		return fail(stdout, stderr, cmd, err)
	}
	if err := emit(stdout, report, o.pretty); err != nil { // nothing was written: still one JSON object
		return fail(stdout, stderr, cmd, fmt.Errorf("%w: report: %v", compression.ErrInternal, err))
	}
	return code
}

// exitCode maps an error to the documented exit codes.
func exitCode(err error) int {
	switch {
	case errors.Is(err, errUsage), errors.Is(err, compression.ErrConfig), errors.Is(err, compression.ErrPreset),
		errors.Is(err, atomicfile.ErrSamePath), errors.Is(err, atomicfile.ErrNotRegular):
		return exitUsage
	case isInputError(err):
		return exitInput
	default:
		return exitFailure
	}
}

func isInputError(err error) bool {
	for _, target := range []error{
		mapfile.ErrNotRegular, safetensors.ErrTooShort, safetensors.ErrHeaderTooLarge, safetensors.ErrHeaderLength,
		safetensors.ErrHeaderEncoding, safetensors.ErrHeaderStart, safetensors.ErrHeaderJSON,
		safetensors.ErrDuplicate, safetensors.ErrMetadata, safetensors.ErrDType, safetensors.ErrShape,
		safetensors.ErrOffsets, safetensors.ErrOverflow, safetensors.ErrSizeMismatch, safetensors.ErrOverlap,
		safetensors.ErrTruncated, safetensors.ErrTrailing, safetensors.ErrName,
		compression.ErrGroupSize, compression.ErrNonFinite, compression.ErrScaleOverflow,
		compression.ErrNotContainer, compression.ErrAlreadyContainer, compression.ErrVersion,
		compression.ErrCorrupt, compression.ErrChecksum, compression.ErrTooLarge, compression.ErrSelection, compression.ErrProjection,
	} {
		if errors.Is(err, target) {
			return true
		}
	}
	return false
}

func fail(stdout, stderr io.Writer, cmd string, err error) int {
	code := exitCode(err)
	msg := strings.ReplaceAll(err.Error(), "\n", " ")
	fmt.Fprintf(stderr, "kv-compress: %s\n", msg)
	emit(stdout, map[string]any{"schema_version": compression.SchemaVersion, "command": cmd, "error": msg, "exit_code": code}, false)
	return code
}

// emit writes v as one JSON document and a newline. encoding/json encodes
// the whole document before writing it, so when v does not encode nothing is
// written and the caller can still print its error object.
func emit(w io.Writer, v any, pretty bool) error {
	enc := json.NewEncoder(w)
	if pretty {
		enc.SetIndent("", "  ")
	}
	return enc.Encode(v)
}

func usage(w io.Writer) {
	fmt.Fprint(w, `kv-compress: per-group quantization + entropy coding of safetensors KV caches

usage:
  kv-compress compress   -i IN -o OUT [codec flags] [--strict]
  kv-compress decompress -i IN -o OUT
  kv-compress metrics    -i IN [codec flags] [--strict]
  kv-compress inspect    -i FILE [--verify]
  kv-compress version

codec flags: --preset seed|default|compact|near-lossless|FILE.json (--seed-scheme = --preset seed),
  then, on top of the preset: --group-size 32|64|128, --scheme sym|asym|nf, --rotate none|hadamard,
  --key-axis token|channel, --sink N, --bits 2|3|4|8, --key-bits, --value-bits, --sparsity S,
  --entropy auto|lz4|none
common flags: --workers N, --max-memory SIZE, --no-sync, --verbose, --pretty; inspect: --verify. Run 'kv-compress SUBCOMMAND -h' for details.
stdout is one JSON object; diagnostics go to stderr.
exit codes: 0 ok, 1 I/O or internal error, 2 usage, 3 invalid input, 4 quality gate failed (--strict)
`)
}
