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
	trial  []byte // the kept output of a trial that covered the whole payload
	// reuse makes encode's results slices of arena, which reset empties;
	// otherwise each result is a fresh allocation.
	reuse bool
	arena []byte
}

// keep returns a copy of b that aliases none of the encoder's working
// buffers: a fresh allocation, or with reuse the next bytes of the arena
// (a full arena is replaced by a larger one; slices already handed out
// keep the old one alive).
func (e *payloadEncoder) keep(b []byte) []byte {
	if !e.reuse {
		return append([]byte(nil), b...)
	}
	n := len(e.arena)
	if cap(e.arena)-n < len(b) {
		e.arena, n = make([]byte, 0, max(2*cap(e.arena), len(b))), 0
	}
	e.arena = append(e.arena, b...)
	return e.arena[n : n+len(b) : n+len(b)]
}

// reset makes the arena's memory available again. Only with reuse, and only
// once every result since the previous reset has been consumed (written out).
func (e *payloadEncoder) reset() { e.arena = e.arena[:0] }

// encode returns raw under the stage the policy picks, and that stage's name.
// The result never aliases raw or the encoder's working buffers; with reuse
// it is valid until the next reset.
func (e *payloadEncoder) encode(raw []byte) ([]byte, string) {
	switch {
	case e.policy == EntropyNone:
		return e.keep(raw), EncodingStored
	case e.policy != EntropyAuto || len(raw) < minEntropyBytes:
		data, enc := e.lz.encode(raw)
		return e.keep(data), enc
	}
	sample := raw
	if len(raw) > 2*sampleBytes {
		sample = raw[:sampleBytes]
	}
	whole := len(sample) == len(raw)
	best, bestSize := EncodingStored, len(sample)-len(sample)/32 // a stage must save 1/32 to be worth decoding
	var kept []byte                                              // the best trial's output when the sample is the whole payload
	try := func(enc string) {
		if out, ok := e.apply(enc, sample); ok && len(out) < bestSize {
			best, bestSize = enc, len(out)
			if whole {
				kept = append(e.trial[:0], out...)
				e.trial = kept
			}
		}
	}
	// LZ4 first: on data without matches it gives up within a few
	// microseconds. When it finds nothing and the order-0 bound promises
	// huff0 a clear saving, huff0 is what the trials would pick (zstd is
	// only tried when huff0 fails or LZ4 wins), so the sample trial of
	// huff0 is skipped. Otherwise every stage is measured as before: the
	// Huffman estimate gates huff0, and zstd adds matches to what huff0
	// does, so it is only worth its time when LZ4 finds matches, or when
	// huff0 found nothing.
	est, pmax := order0Bytes(sample)
	try(EncodingLZ4)
	if best == EncodingStored && huffClearlyWins(est, pmax, len(sample), bestSize) {
		return e.final(EncodingHuff0, raw, nil)
	}
	lz := best
	if est < float64(bestSize) {
		try(EncodingHuff0)
	}
	if best == EncodingLZ4 || (best == EncodingStored && lz == EncodingStored) {
		try(EncodingZstd)
	}
	if best == EncodingStored {
		return e.keep(raw), EncodingStored
	}
	return e.final(best, raw, kept)
}

// huffClearlyWins reports whether huff0 is certain to save what the trials
// ask of a stage (bestSize) on a sample of n bytes whose order-0 bound is
// est bytes and whose most frequent byte has probability pmax: a Huffman
// code spends at most pmax + 0.086 bits per symbol over the bound
// (Gallager's bound), and each block adds at most a 129-byte table, a
// 6-byte jump table and the 4-byte header of the framing.
func huffClearlyWins(est, pmax float64, n, bestSize int) bool {
	blocks := (n + huffBlock - 1) / huffBlock
	return est+float64(n)*(pmax+0.086)/8+float64(blocks*(129+6+4)) < float64(bestSize)
}

// final encodes the whole payload with the chosen stage (kept is its output
// when the trial already ran on the whole payload) and returns a copy that
// aliases none of the encoder's buffers; stored when the stage does not
// shrink the payload within the expansion rules.
func (e *payloadEncoder) final(enc string, raw, kept []byte) ([]byte, string) {
	if kept != nil {
		return e.keep(kept), enc
	}
	out, ok := e.apply(enc, raw)
	if !ok || len(out) >= len(raw) {
		return e.keep(raw), EncodingStored
	}
	return e.keep(out), enc
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

// order0Bytes estimates the bytes an order-0 entropy coder needs for b, and
// returns the probability of b's most frequent byte.
func order0Bytes(b []byte) (float64, float64) {
	// Four histograms break the store-to-load dependency of runs of equal bytes.
	var hist [4][256]uint32
	i := 0
	for ; i+4 <= len(b); i += 4 {
		hist[0][b[i]]++
		hist[1][b[i+1]]++
		hist[2][b[i+2]]++
		hist[3][b[i+3]]++
	}
	for ; i < len(b); i++ {
		hist[0][b[i]]++
	}
	n := float64(len(b))
	bits, top := 0.0, uint32(0)
	for c := range 256 {
		h := hist[0][c] + hist[1][c] + hist[2][c] + hist[3][c]
		if h > 0 {
			bits -= float64(h) * math.Log2(float64(h)/n)
			top = max(top, h)
		}
	}
	return bits / 8, float64(top) / n
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

// huffScratch keeps the decoding tables of huff0 between payloads: ReadTable
// refills them from each block's own table, so nothing carries over but the
// memory.
var huffScratch = sync.Pool{New: func() any { return new(huff0.Scratch) }}

// huffDecode expands huff0 blocks into dst (len(dst) = the payload's raw size).
func huffDecode(data, dst []byte) error {
	s := huffScratch.Get().(*huff0.Scratch)
	defer huffScratch.Put(s)
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
			s2, rest, err := huff0.ReadTable(body, s)
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
	for _, p := range e.payloads() {
		if p != nil && !slices.Contains(encodingsOf(version), p.Encoding) {
			return fmt.Errorf("%w: payload %q: encoding %q does not exist in version %d (want one of %v)",
				ErrCorrupt, p.Tensor, p.Encoding, version, encodingsOf(version))
		}
	}
	return nil
}
