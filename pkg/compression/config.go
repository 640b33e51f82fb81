// Package compression implements the kv-compress codec: per-group symmetric
// INT4 quantization of floating-point tensors, LZ4 on the packed payloads, a
// container that is itself a safetensors file, and the quality metrics that
// compare a reconstruction with its original.
//
// The byte layout and the exact arithmetic are specified in docs/format.md;
// the reconstruction is deterministic and reproducible bit for bit from those
// rules (the Python test suite checks it against an independent reference).
package compression

import (
	"errors"
	"fmt"
	"math"
	"slices"
)

// Errors returned (wrapped with context) by this package.
var (
	// ErrConfig marks an invalid codec parameter: a usage error.
	ErrConfig = errors.New("compression: invalid configuration")
	// ErrGroupSize means a tensor's last dimension is not a multiple of the group size.
	ErrGroupSize = errors.New("compression: group size does not divide the last dimension")
	// ErrNonFinite means a tensor holds NaN or Inf, which cannot be quantized.
	ErrNonFinite = errors.New("compression: tensor holds NaN or Inf")
	// ErrScaleOverflow means a group's scale does not fit in float16.
	ErrScaleOverflow = errors.New("compression: group scale overflows float16")
	// ErrNotContainer means a file is not a kv-compress container.
	ErrNotContainer = errors.New("compression: not a kv-compress container")
	// ErrAlreadyContainer means compress was given a file that is already a container.
	ErrAlreadyContainer = errors.New("compression: input is already a kv-compress container")
	// ErrVersion means a container was written by an unknown format version.
	ErrVersion = errors.New("compression: unsupported container version")
	// ErrCorrupt means a container's index or payloads are inconsistent or damaged.
	ErrCorrupt = errors.New("compression: corrupt container")
	// ErrChecksum means a payload's checksum does not match its bytes.
	ErrChecksum = errors.New("compression: payload checksum mismatch")
)

// Format identification recorded in every container's metadata.
const (
	FormatName    = "kv-compress"
	FormatVersion = 2
)

// ReadableVersions are the container versions this build decodes; it writes FormatVersion.
var ReadableVersions = []int{1, 2}

// Allowed codec parameters.
var (
	// GroupSizes are the accepted quantization group sizes.
	GroupSizes = []int{32, 64, 128}
)

// Default codec parameters: those of the command line and DefaultConfig.
// They were chosen from the measured frontier (docs/codec-frontier.md): the
// lowest perplexity delta at 3.7x or more on disk. The seed's scheme is
// SeedConfig: no rotation, no sink.
const (
	DefaultGroupSize = 64
	DefaultSparsity  = 0.0
	DefaultBits      = 4
	DefaultScheme    = SchemeSym
	DefaultRotate    = RotateHadamard
	DefaultKeyAxis   = KeyAxisChannel
	DefaultSink      = 1
	DefaultEntropy   = EntropyAuto
)

// Config holds the codec parameters chosen by the user.
type Config struct {
	// GroupSize is the number of consecutive elements along the last axis
	// that share one scale: 32, 64 or 128.
	GroupSize int
	// Sparsity is the fraction in [0, 1) of each tensor's smallest-magnitude
	// elements set to zero before quantizing.
	Sparsity float64
	// Workers bounds the number of tensors processed at once; 0 means
	// GOMAXPROCS, and more than MaxWorkersPerCPU per CPU count as that many.
	Workers int
	// NoSync makes CompressFile and DecompressFile skip the fsync before
	// the output is renamed into place: for scratch folders whose files
	// need not survive a crash. Like Workers it is not part of the codec.
	NoSync bool
	// MaxMemory is the memory budget in bytes for working buffers and
	// decoded data; 0 means DefaultMaxMemory(). A job that cannot fit in it
	// even with one worker is refused with ErrTooLarge before allocating.
	MaxMemory int64
	// Scheme is "sym" (scale only) or "asym" (float16 minimum and scale).
	// Like every field, its zero value means the seed's choice ("sym");
	// DefaultConfig holds the recommended ones.
	Scheme string
	// Rotate is "none" (also "") or "hadamard".
	Rotate string
	// KeyAxis is "token" (also "": groups along the last axis) or "channel"
	// (key tensors grouped along the sequence axis).
	KeyAxis string
	// Sink is the number of leading sequence positions of every tensor of
	// rank >= 2 kept exact in the original dtype.
	Sink int
	// Bits is the code width (2, 3, 4 or 8) of tensors that are neither keys
	// nor values, and of keys and values unless KeyBits / ValueBits say
	// otherwise; 0 means 4.
	Bits, KeyBits, ValueBits int
	// Entropy is the payloads' entropy policy: "auto", "lz4" (also "": LZ4
	// or stored, the seed's) or "none".
	Entropy string
	// Roles, when not nil, gives keys and values (of all layers or of some)
	// plans of their own on top of the fields above.
	Roles *RolePlans
	// Projection, when not nil, holds low-rank bases by tensor name: those
	// tensors are projected before quantizing (projection.go).
	Projection *ProjectionSet
	// Selection, when not nil, is the token selection a preset file says
	// the input went through (selection_preset.go): checked against the
	// input's positions tensors and reported, never applied, and not part
	// of the codec record.
	Selection *PresetSelection
	// contextLength is the input's original context length when it holds
	// positions tensors (selection.go); set by Compress and CompressFile.
	contextLength int64
	// Preset names the preset the configuration came from ("" for none).
	Preset string
	// ExactMetrics measures the error of rotated tensors in the original
	// basis, after the inverse rotation and the rounding to the tensor's
	// dtype, as the restored file holds them. By default the error is
	// measured in the rotated basis, which the orthonormal rotation leaves
	// unchanged up to that rounding and costs no inverse rotation (see
	// rotatedMetrics).
	ExactMetrics bool
}

// DefaultConfig returns the recommended codec parameters, the command line's defaults.
func DefaultConfig() Config {
	return Config{GroupSize: DefaultGroupSize, Sparsity: DefaultSparsity, Scheme: DefaultScheme, Rotate: DefaultRotate,
		KeyAxis: DefaultKeyAxis, Sink: DefaultSink, Bits: DefaultBits, Entropy: DefaultEntropy}
}

func or[T comparable](v, def T) T {
	var zero T
	if v == zero {
		return def
	}
	return v
}

// SeedConfig returns the seed's scheme: symmetric 4-bit, G = 64, no rotation,
// no sink (3.76x before LZ4). Zero-valued fields of any Config mean these.
func SeedConfig() Config {
	return Config{GroupSize: DefaultGroupSize, Scheme: SchemeSym, Rotate: RotateNone, KeyAxis: KeyAxisToken, Bits: 4}
}

func (c Config) scheme() string  { return or(c.Scheme, SchemeSym) }
func (c Config) rotate() string  { return or(c.Rotate, RotateNone) }
func (c Config) keyAxis() string { return or(c.KeyAxis, KeyAxisToken) }
func (c Config) bits() int       { return or(c.Bits, 4) }
func (c Config) keyBits() int    { return or(c.KeyBits, c.bits()) }
func (c Config) valueBits() int  { return or(c.ValueBits, c.bits()) }
func (c Config) entropy() string { return or(c.Entropy, EntropyLZ4) }

// Validate checks the parameters, naming the allowed values and the value received.
func (c Config) Validate() error {
	ok := false
	for _, g := range GroupSizes {
		ok = ok || c.GroupSize == g
	}
	if !ok {
		return fmt.Errorf("%w: group size must be one of %v, got %d", ErrConfig, GroupSizes, c.GroupSize)
	}
	if !(c.Sparsity >= 0 && c.Sparsity < 1) || math.IsNaN(c.Sparsity) {
		return fmt.Errorf("%w: sparsity must be in [0, 1), got %v", ErrConfig, c.Sparsity)
	}
	if s := c.scheme(); !slices.Contains(Schemes, s) {
		return fmt.Errorf("%w: scheme must be one of %v, got %q", ErrConfig, Schemes, s)
	}
	if r := c.rotate(); r != RotateNone && r != RotateHadamard {
		return fmt.Errorf("%w: rotate must be one of [none hadamard], got %q", ErrConfig, r)
	}
	if a := c.keyAxis(); a != KeyAxisToken && a != KeyAxisChannel {
		return fmt.Errorf("%w: key axis must be one of [token channel], got %q", ErrConfig, a)
	}
	if e := c.entropy(); !slices.Contains(EntropyPolicies, e) {
		return fmt.Errorf("%w: entropy must be one of %v, got %q", ErrConfig, EntropyPolicies, e)
	}
	if c.Sink < 0 || c.Sink > MaxSink {
		return fmt.Errorf("%w: sink must be in [0, %d], got %d", ErrConfig, MaxSink, c.Sink)
	}
	for _, b := range []struct {
		name string
		v    int
	}{{"bits", c.Bits}, {"key bits", c.KeyBits}, {"value bits", c.ValueBits}} {
		if b.v != 0 && !slices.Contains(BitWidths, b.v) {
			return fmt.Errorf("%w: %s must be one of %v, got %d", ErrConfig, b.name, BitWidths, b.v)
		}
	}
	if c.scheme() == SchemeNF {
		for _, b := range []int{c.bits(), c.keyBits(), c.valueBits()} {
			if !slices.Contains(NFBitWidths, b) {
				return fmt.Errorf("%w: scheme nf takes bits %v, got %d", ErrConfig, NFBitWidths, b)
			}
		}
	}
	if err := c.Roles.Validate(); err != nil {
		return err
	}
	if err := c.Selection.Validate(); err != nil {
		return err
	}
	if c.Workers < 0 {
		return fmt.Errorf("%w: workers must be >= 0, got %d", ErrConfig, c.Workers)
	}
	if c.MaxMemory < 0 {
		return fmt.Errorf("%w: memory budget must be >= 0, got %d", ErrConfig, c.MaxMemory)
	}
	return nil
}

func (c Config) workers() int { return capWorkers(c.Workers) }

func (c Config) maxMemory() int64 { return or(c.MaxMemory, DefaultMaxMemory()) }
