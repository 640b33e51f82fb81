package compression

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"

	"github.com/klauspost/compress/huff0"
	"github.com/klauspost/compress/zstd"
)

// Entropy stages a payload can be stored with in a version-2 container, in
// addition to version 1's EncodingLZ4 and EncodingStored (the "none" stage).
const (
	EncodingHuff0 = "huff0" // Huffman-only blocks (klauspost/compress/huff0, 4 streams), framed as docs/format.md says
	EncodingZstd  = "zstd"  // one zstd frame (klauspost/compress/zstd, fastest level, literals always entropy coded)
)

// Entropy policies: which stages the encoder may choose from.
const (
	// EntropyAuto measures every stage on a sample of each payload and keeps
	// the smallest (stored when nothing saves at least 1/32).
	EntropyAuto = "auto"
	// EntropyLZ4 is version 1's policy: LZ4 or stored.
	EntropyLZ4 = "lz4"
	// EntropyNone stores every payload raw.
	EntropyNone = "none"
)

// EntropyPolicies lists the accepted entropy policies.
var EntropyPolicies = []string{EntropyAuto, EntropyLZ4, EntropyNone}

// huffBlock is the raw size of one huff0 block of a payload (the last may be
// shorter); huff0 itself takes at most 256 KiB - 1 per call.
const huffBlock = 128 << 10

// Block kinds of the huff0 framing: the two high bits of a block's header.
const (
	huffBlockRaw  = 0 // the block's raw bytes follow
	huffBlockHuff = 1 // a huff0 table and 4X streams follow
)

// maxExpansion bounds how much any payload may expand, whatever its stage:
// raw_bytes <= maxExpansion × stored bytes + 16. It is LZ4's own limit, and
// the encoder never picks a stage that exceeds it, so a decoder refuses a
// larger declared size before allocating anything.
const maxExpansion = maxLZ4Ratio

// maxZstdPayload is the largest payload written as zstd: one frame's window
// is its whole content, and klauspost's decoder refuses windows over 512 MiB.
const maxZstdPayload = 256 << 20

// sampleBytes is the sample a large payload's stages are measured on.
const sampleBytes = 16 << 10

// minEntropyBytes is the smallest payload worth measuring; smaller ones go
// through LZ4 (which stores them raw unless they shrink).
const minEntropyBytes = 256

var (
	zstdEncOnce sync.Once
	zstdEnc     *zstd.Encoder
	zstdDecOnce sync.Once
	zstdDec     *zstd.Decoder
	zstdErr     error
)

// zstdEncoder returns the shared zstd encoder (EncodeAll is safe for
// concurrent use): fastest level, literals always Huffman coded (without it
// the fastest level skips them and gains nothing on packed codes), no frame
// checksum (the container has CRC-32C), the content size in the header.
func zstdEncoder() *zstd.Encoder {
	zstdEncOnce.Do(func() {
		zstdEnc, _ = zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithAllLitEntropyCompression(true),
			zstd.WithEncoderCRC(false), zstd.WithSingleSegment(true), zstd.WithZeroFrames(true), zstd.WithLowerEncoderMem(true))
	})
	return zstdEnc
}

// zstdDecoder returns the shared zstd decoder. DecodeAll writes at most
// cap(dst) bytes (WithDecodeAllCapLimit), so a payload never decodes past
// the size its index entry declares.
func zstdDecoder() (*zstd.Decoder, error) {
	zstdDecOnce.Do(func() {
		zstdDec, zstdErr = zstd.NewReader(nil, zstd.WithDecodeAllCapLimit(true), zstd.WithDecoderConcurrency(0),
			zstd.WithDecoderLowmem(true), zstd.WithDecoderMaxMemory(1<<40))
	})
	return zstdDec, zstdErr
}

// payloadEncoder chooses and applies the entropy stage of each payload. One
// per goroutine; its buffers are reused between payloads.
type payloadEncoder struct {
	policy string
	lz     lz4Encoder
	huff   huff0.Scratch
	buf    []byte
}

// encode returns raw under the stage the policy picks, and that stage's name.
// The result never aliases raw or the encoder's buffers.
func (e *payloadEncoder) encode(raw []byte) ([]byte, string) {
	switch {
	case e.policy == EntropyNone:
		return append([]byte(nil), raw...), EncodingStored
	case e.policy != EntropyAuto || len(raw) < minEntropyBytes:
		return e.lz.encode(raw)
	}
	sample := raw
	if len(raw) > 2*sampleBytes {
		sample = raw[:sampleBytes]
	}
	best, bestSize := EncodingStored, len(sample)-len(sample)/32 // a stage must save 1/32 to be worth decoding
	try := func(enc string) {
		if out, ok := e.apply(enc, sample); ok && len(out) < bestSize {
			best, bestSize = enc, len(out)
		}
	}
	// The Huffman estimate from the histogram is cheap: only run huff0 when
	// the order-0 entropy promises a saving. zstd adds matches to what huff0
	// does, so it is only worth its time when LZ4 finds matches, or when
	// huff0 found nothing.
	if order0Bytes(sample) < float64(bestSize) {
		try(EncodingHuff0)
	}
	huff := best
	try(EncodingLZ4)
	if best == EncodingLZ4 || huff == EncodingStored {
		try(EncodingZstd)
	}
	if best == EncodingStored {
		return append([]byte(nil), raw...), EncodingStored
	}
	if len(sample) < len(raw) {
		out, ok := e.apply(best, raw)
		if !ok || len(out) >= len(raw) {
			return append([]byte(nil), raw...), EncodingStored
		}
		return append([]byte(nil), out...), best
	}
	out, _ := e.apply(best, raw)
	return append([]byte(nil), out...), best
}

// apply encodes src with one stage into e.buf; ok is false when the stage
// cannot encode it within the size and expansion rules.
func (e *payloadEncoder) apply(enc string, src []byte) ([]byte, bool) {
	var out []byte
	switch enc {
	case EncodingLZ4:
		e.buf = grow(e.buf, len(src))
		n, err := e.lz.c.CompressBlock(src, e.buf)
		if err != nil || n == 0 {
			return nil, false
		}
		out = e.buf[:n]
	case EncodingHuff0:
		out = e.huffEncode(src)
	case EncodingZstd:
		if len(src) > maxZstdPayload {
			return nil, false
		}
		out = zstdEncoder().EncodeAll(src, e.buf[:0])
		e.buf = out[:0]
	default:
		return nil, false
	}
	if len(out) == 0 || len(out) >= len(src) || int64(len(src)) > int64(len(out))*maxExpansion+16 {
		return nil, false
	}
	return out, true
}

// huffEncode writes src as huff0 blocks into e.buf: per block a 4-byte
// little-endian header (kind in the two high bits, body length below) and
// the body. A block huff0 cannot shrink is stored raw.
func (e *payloadEncoder) huffEncode(src []byte) []byte {
	out := e.buf[:0]
	for off := 0; off < len(src); off += huffBlock {
		blk := src[off:min(off+huffBlock, len(src))]
		e.huff.Reuse = huff0.ReusePolicyNone
		comp, _, err := huff0.Compress4X(blk, &e.huff)
		kind, body := uint32(huffBlockHuff), comp
		if err != nil || len(comp) >= len(blk) {
			kind, body = huffBlockRaw, blk
		}
		out = binary.LittleEndian.AppendUint32(out, kind<<30|uint32(len(body)))
		out = append(out, body...)
	}
	e.buf = out[:0]
	return out
}

// order0Bytes estimates the bytes an order-0 entropy coder needs for b.
func order0Bytes(b []byte) float64 {
	var hist [256]uint32
	for _, c := range b {
		hist[c]++
	}
	n := float64(len(b))
	bits := 0.0
	for _, h := range hist {
		if h > 0 {
			p := float64(h) / n
			bits -= float64(h) * math.Log2(p)
		}
	}
	return bits / 8
}

// decodeEntropy expands a huff0 or zstd payload into dst, which has exactly
// the declared raw size; nothing is allocated from sizes the data declares.
func decodeEntropy(data []byte, encoding string, dst []byte) error {
	switch encoding {
	case EncodingHuff0:
		return huffDecode(data, dst)
	case EncodingZstd:
		d, err := zstdDecoder()
		if err != nil {
			return fmt.Errorf("%w: zstd: %v", ErrCorrupt, err)
		}
		out, err := d.DecodeAll(data, dst[:0:len(dst)])
		if err != nil {
			return fmt.Errorf("%w: zstd: %v", ErrCorrupt, err)
		}
		if len(out) != len(dst) || (len(out) > 0 && &out[0] != &dst[0]) {
			return fmt.Errorf("%w: zstd frame decodes to %d bytes, want %d", ErrCorrupt, len(out), len(dst))
		}
		return nil
	}
	return fmt.Errorf("%w: unknown payload encoding %q", ErrCorrupt, encoding)
}

var errHuffFraming = errors.New("huff0 framing")

// huffDecode expands huff0 blocks into dst (len(dst) = the payload's raw size).
func huffDecode(data, dst []byte) error {
	var s huff0.Scratch
	for off := 0; off < len(dst); off += huffBlock {
		blk := dst[off:min(off+huffBlock, len(dst))]
		if len(data) < 4 {
			return fmt.Errorf("%w: %w: block at %d has no header", ErrCorrupt, errHuffFraming, off)
		}
		h := binary.LittleEndian.Uint32(data)
		kind, n := h>>30, int(h&(1<<30-1))
		data = data[4:]
		if n > len(data) {
			return fmt.Errorf("%w: %w: block at %d declares %d bytes, %d left", ErrCorrupt, errHuffFraming, off, n, len(data))
		}
		body := data[:n]
		data = data[n:]
		switch kind {
		case huffBlockRaw:
			if n != len(blk) {
				return fmt.Errorf("%w: %w: raw block at %d has %d bytes, want %d", ErrCorrupt, errHuffFraming, off, n, len(blk))
			}
			copy(blk, body)
		case huffBlockHuff:
			s.MaxDecodedSize = len(blk)
			s2, rest, err := huff0.ReadTable(body, &s)
			if err != nil {
				return fmt.Errorf("%w: huff0 table of block at %d: %v", ErrCorrupt, off, err)
			}
			out, err := s2.Decoder().Decompress4X(blk[:0:len(blk)], rest)
			if err != nil {
				return fmt.Errorf("%w: huff0 block at %d: %v", ErrCorrupt, off, err)
			}
			if len(out) != len(blk) {
				return fmt.Errorf("%w: huff0 block at %d decodes to %d bytes, want %d", ErrCorrupt, off, len(out), len(blk))
			}
		default:
			return fmt.Errorf("%w: %w: block at %d has unknown kind %d", ErrCorrupt, errHuffFraming, off, kind)
		}
	}
	if len(data) != 0 {
		return fmt.Errorf("%w: %w: %d bytes after the last block", ErrCorrupt, errHuffFraming, len(data))
	}
	return nil
}

// encodingsOf lists the payload encodings a container version may use.
func encodingsOf(version int) []string {
	if version == 1 {
		return []string{EncodingLZ4, EncodingStored}
	}
	return []string{EncodingStored, EncodingLZ4, EncodingHuff0, EncodingZstd}
}

// checkVersionedCodec refuses codec fields a container's version cannot hold.
func checkVersionedCodec(version int, c Codec) error {
	if version == 1 && (c.Entropy != "" || c.Preset != "" || c.Roles != nil) {
		return fmt.Errorf("%w: a version-1 codec has no entropy policy, preset or role plans", ErrCorrupt)
	}
	return nil
}

// checkEncodings refuses what an entry's container version does not know
// (payload encodings, a group size of its own), and a group size its axis
// does not allow. It runs before any size is computed from the entry.
func checkEncodings(version int, e *Entry, codecGroup int) error {
	if e.GroupSize != 0 {
		if version == 1 {
			return fmt.Errorf("%w: a version-1 entry has no group size of its own", ErrCorrupt)
		}
		if e.Mode == ModeStored || bitsOfMode(e.Mode) == 0 {
			return fmt.Errorf("%w: group size on an entry of mode %q", ErrCorrupt, e.Mode)
		}
		if err := e.plan(codecGroup).checkGroup(); err != nil {
			return err
		}
	}
	for _, p := range []*Payload{e.Codes, e.Scales, e.Mins, e.SinkP, e.Raw} {
		if p != nil && !slices.Contains(encodingsOf(version), p.Encoding) {
			return fmt.Errorf("%w: payload %q: encoding %q does not exist in version %d (want one of %v)",
				ErrCorrupt, p.Tensor, p.Encoding, version, encodingsOf(version))
		}
	}
	return nil
}
