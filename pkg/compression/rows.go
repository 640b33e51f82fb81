package compression

import (
	"encoding/binary"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// This file holds the entry points of the vectorised encoders and decoders:
// groups along the last axis (rows) or, for per-channel keys, along the
// sequence (channels), optionally after the Hadamard rotation. The encoders
// take the symmetric and asymmetric schemes at 2, 3 and 4 bits, which covers
// the version-1 scheme, the default codec and the narrower options; the
// decoders take symmetric 4-bit codes. The vector
// code (rows_*simd_amd64.go) exists only in builds with GOEXPERIMENT=simd on
// amd64, runs only on CPUs with AVX2, and must produce the same bytes as the
// scalar encoders; anything it does not handle, it declines, and the caller
// takes the scalar path. See docs/decisions/ADR-005-simd.md.

// codeSpec is the code range of a scheme and width, as levels gives it.
type codeSpec struct {
	asym   bool
	bits   int
	lo, hi int32
	div    float32
}

// sym4 is the version-1 scheme's code range: symmetric 4-bit codes.
var sym4 = codeSpec{bits: 4, lo: qmin, hi: qmax, div: qmax}

func specOf(p tensorPlan) codeSpec {
	lo, hi, _ := levels(p.Scheme, p.Bits)
	return codeSpec{asym: p.Scheme == SchemeAsym, bits: p.Bits, lo: lo, hi: hi, div: p.divisor()}
}

// vectorWidth reports whether the vector encoders take codes of this width.
func vectorWidth(bits int) bool { return bits == 2 || bits == 3 || bits == 4 }

// rowJob is one run of consecutive rows to encode: rows·dim elements of
// dtype dt, little-endian, in src. Groups of group elements never span rows.
// codes receives rows·dim·bits/8 bytes, the codes packed LSB-first as the
// general encoder's bitWriter packs them; scales (and mins, asym only)
// receive the little-endian float16 scale (minimum) of each group, 2 bytes
// each. A zero spec means sym4.
type rowJob struct {
	src    []byte
	dt     safetensors.DType
	dim    int
	group  int
	rot    *rotation // nil: no rotation
	codes  []byte
	scales []byte
	mins   []byte
	spec   codeSpec
	// rotated: with a rotation, measure the error between the rotated
	// values and their quantized reconstruction (no inverse rotation, no
	// rounding to dt); see rotatedMetrics.
	rotated bool
}

// Encoder names the compression path this build and CPU run: "avx2" for the
// vector row encoder, "scalar" otherwise. Both write identical bytes; only
// the speed differs.
func Encoder() string {
	if haveSIMD {
		return "avx2"
	}
	return "scalar"
}

// simdEnabled lets tests turn the vector encoder off to compare it with the
// scalar paths in the same build; it is never changed outside tests.
var simdEnabled = haveSIMD

// rowsSupported reports whether the vector encoder can take a job of this
// geometry; it may still decline a particular block (a non-finite value, a
// scale or reconstruction outside float16's range), which encodeRows reports.
func rowsSupported(dt safetensors.DType, dim, group int, rot *rotation) bool {
	if !simdEnabled || dim%8 != 0 || group%8 != 0 || dim%group != 0 {
		return false
	}
	if rot != nil && (rot.n%8 != 0 || dim%rot.n != 0) {
		return false
	}
	return dt == safetensors.F16 || dt == safetensors.BF16 || dt == safetensors.F32
}

// encodeRows runs job with the vector encoder and adds the reconstruction
// error to st. It returns false, with st unchanged and the outputs in an
// unspecified state, when the job must go through the scalar path instead.
func encodeRows(job rowJob, st *tensorStats) bool {
	if !rowsSupported(job.dt, job.dim, job.group, job.rot) {
		return false
	}
	if job.spec.bits == 0 {
		job.spec = sym4
	}
	if !vectorWidth(job.spec.bits) {
		return false
	}
	var local tensorStats
	if !encodeRowsSIMD(&job, &local) {
		return false
	}
	st.merge(local)
	return true
}

// channelJob is one outer block of a tensor grouped along the sequence axis
// (per-channel keys): keep rows of dim elements of dtype dt in src, rotated
// along each row first when rot is not nil, then cut per channel into groups
// of group consecutive positions (the last one shorter). codes receives the
// keep·dim·bits/8 bytes of the block, channel d's codes at bits [d·keep·bits,
// (d+1)·keep·bits); scales (and mins) the dim·⌈keep/group⌉ float16 scales
// (minimums), channel-major. A zero spec means sym4.
type channelJob struct {
	src     []byte
	dt      safetensors.DType
	dim     int
	keep    int
	group   int
	rot     *rotation
	codes   []byte
	scales  []byte
	mins    []byte
	spec    codeSpec
	rotated bool
	// x and w are working memory of at least group·dim elements each, packed
	// of 4·dim·⌈keep/8⌉ bytes.
	x, w   []float32
	packed []byte
}

// encodeChannels is encodeRows for a channelJob.
func encodeChannels(job channelJob, st *tensorStats) bool {
	if !rowsSupported(job.dt, job.dim, 8, job.rot) || job.group < 8 || job.group%8 != 0 {
		return false
	}
	if job.spec.bits == 0 {
		job.spec = sym4
	}
	if !vectorWidth(job.spec.bits) {
		return false
	}
	var local tensorStats
	if !encodeChannelsSIMD(&job, &local) {
		return false
	}
	st.merge(local)
	return true
}

// packNibbles copies the first n 4-bit codes of src (packed two to a byte,
// low nibble first) into dst from nibble index at on; dst's bytes there must
// be zero.
func packNibbles(dst []byte, at int, src []byte, n int) {
	if n == 0 {
		return
	}
	if at%2 == 0 {
		copy(dst[at/2:], src[:n/2])
		if n%2 == 1 {
			dst[at/2+n/2] |= src[n/2] & 0xf
		}
		return
	}
	// Odd start: every code moves up by one nibble. Output byte i ≥ 1 is
	// (src[i−1] >> 4) | (src[i] << 4): eight at a time, a 64-bit shift.
	out := dst[at/2 : (at+n+1)/2]
	out[0] |= src[0] << 4
	i := 1
	for ; i+8 < len(out) && i+8 <= n/2; i += 8 {
		v := binary.LittleEndian.Uint64(src[i-1:]) >> 4
		binary.LittleEndian.PutUint64(out[i:], v|uint64(src[i+7])<<60)
	}
	for ; i < len(out); i++ {
		b := src[i-1] >> 4
		if 2*i < n {
			b |= src[i] << 4
		}
		out[i] |= b
	}
}

// packBits ORs the first n bits of src (LSB-first) into dst from bit index
// at on; dst's bits there must be zero.
func packBits(dst []byte, at int, src []byte, n int) {
	if n == 0 {
		return
	}
	sh := uint(at % 8)
	out := dst[at/8 : (at+n+7)/8]
	nb := (n + 7) / 8 // source bytes holding the n bits
	// Output byte i takes the bottom bits of source byte i and the top bits
	// of source byte i−1; bits past n are masked off.
	var prev byte
	for i := range out {
		var cur byte
		if i < nb {
			cur = src[i]
			if i == nb-1 && n%8 != 0 {
				cur &= byte(1)<<(n%8) - 1
			}
		}
		out[i] |= cur<<sh | prev>>(8-sh)
		prev = cur
	}
}

// rowDecodeJob is the inverse of a rowJob: it rebuilds rows·dim elements of
// dtype dt into dst from codes and little-endian float16 scales.
type rowDecodeJob struct {
	codes  []byte
	scales []byte
	dt     safetensors.DType
	dim    int
	group  int
	rot    *rotation
	dst    []byte
	// spec and mins (asym only) describe codes other than sym4, packed
	// LSB-first as rowJob packs them; a zero spec means sym4.
	spec codeSpec
	mins []byte
}

// general reports whether the job's codes are other than sym4.
func (j *rowDecodeJob) general() bool { return j.spec != (codeSpec{}) && j.spec != sym4 }

// decodeRows runs job with the vector decoder. It returns false, with dst in
// an unspecified state, when the job must go through the scalar path instead
// (which also reports corrupt scales).
func decodeRows(job rowDecodeJob) bool {
	if !rowsSupported(job.dt, job.dim, job.group, job.rot) {
		return false
	}
	return decodeRowsSIMD(&job)
}

// decodeChannels is decodeRows for per-channel groups: job.codes and
// job.scales are laid out as in a channelJob, over keep positions; y is
// working memory of at least keep·dim elements.
func decodeChannels(job rowDecodeJob, keep int, y []float32) bool {
	if !rowsSupported(job.dt, job.dim, 8, job.rot) || job.group < 8 || job.group%8 != 0 {
		return false
	}
	return decodeChannelsSIMD(&job, keep, y[:keep*job.dim])
}

// nibbleWord returns the 8 codes (fewer, zero-padded, at the end of src) that
// start at nibble index at of src, packed low nibble first into a uint32.
func nibbleWord(src []byte, at int) uint32 {
	if i := at / 2; i+8 <= len(src) { // one unaligned load where 8 bytes remain
		return uint32(binary.LittleEndian.Uint64(src[i:]) >> (4 * (at % 2)))
	}
	var v uint64
	for i, b := range src[at/2 : min(at/2+5, len(src))] {
		v |= uint64(b) << (8 * i)
	}
	return uint32(v >> (4 * (at % 2)))
}

// scalesToBytes writes float16 scales as little-endian bytes.
func scalesToBytes(dst []byte, scales []uint16) {
	for i, s := range scales {
		binary.LittleEndian.PutUint16(dst[2*i:], s)
	}
}
