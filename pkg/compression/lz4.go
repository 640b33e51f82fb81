package compression

import (
	"encoding/hex"
	"fmt"
	"hash/crc32"

	"github.com/pierrec/lz4/v4"
)

// Payload encodings recorded in the container index.
const (
	EncodingLZ4    = "lz4"    // one LZ4 block (no frame)
	EncodingStored = "stored" // the bytes as they are, when LZ4 would not shrink them
)

// maxLZ4Ratio bounds how much one LZ4 block can expand: a literal-free match
// sequence yields at most 255 bytes per input byte. Declared sizes beyond it
// are refused before anything is allocated.
const maxLZ4Ratio = 255

// maxLZ4Expansion is the most an LZ4 block of n bytes can decode to.
func maxLZ4Expansion(n int64) int64 { return n*maxLZ4Ratio + 16 }

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// checksum is the CRC-32C of b as 8 lower-case hex digits, big-endian.
func checksum(b []byte) string {
	c := crc32.Checksum(b, castagnoli)
	return hex.EncodeToString([]byte{byte(c >> 24), byte(c >> 16), byte(c >> 8), byte(c)})
}

// lz4Encoder compresses payloads with LZ4 (the reference implementation's
// fast algorithm: 2.5x faster than pierrec's default on packed codes, within
// 2% of its size), reusing its output buffer between payloads.
type lz4Encoder struct {
	c   lz4.CompressorCCompat
	buf []byte
}

// encode returns raw compressed, or raw itself when LZ4 would not make it
// smaller. The result may alias raw or the encoder's buffer: callers copy
// what they keep (payloadEncoder.keep).
func (e *lz4Encoder) encode(raw []byte) (data []byte, encoding string) {
	if len(raw) >= 4*probeBytes {
		// Probe: when the first probeBytes barely shrink, the rest will not
		// either (packed codes of a group-quantized tensor look alike
		// throughout), so skip the full attempt.
		var tmp [probeBytes]byte
		if n, err := e.c.CompressBlock(raw[:probeBytes], tmp[:probeBytes-probeBytes/32]); err != nil || n == 0 {
			return raw, EncodingStored
		}
	}
	if len(raw) > 0 {
		e.buf = grow(e.buf, len(raw)-1)
		if n, err := e.c.CompressBlock(raw, e.buf); err == nil && n > 0 {
			return e.buf[:n], EncodingLZ4
		}
	}
	return raw, EncodingStored
}

// decodePayload expands data, which must decode to exactly rawSize bytes, into dst.
func decodePayload(data []byte, encoding string, dst []byte) error {
	switch encoding {
	case EncodingStored:
		if len(data) != len(dst) {
			return fmt.Errorf("%w: stored payload has %d bytes, want %d", ErrCorrupt, len(data), len(dst))
		}
		copy(dst, data)
	case EncodingLZ4:
		if int64(len(dst)) > maxLZ4Expansion(int64(len(data))) {
			return fmt.Errorf("%w: %d bytes cannot expand to %d", ErrCorrupt, len(data), len(dst))
		}
		n, err := lz4.UncompressBlock(data, dst)
		if err != nil {
			return fmt.Errorf("%w: lz4: %v", ErrCorrupt, err)
		}
		if n != len(dst) {
			return fmt.Errorf("%w: lz4 block decodes to %d bytes, want %d", ErrCorrupt, n, len(dst))
		}
	case EncodingHuff0, EncodingZstd:
		return decodeEntropy(data, encoding, dst)
	default:
		return fmt.Errorf("%w: unknown payload encoding %q (want one of %v)", ErrCorrupt, encoding, encodingsOf(FormatVersion))
	}
	return nil
}

// probeBytes is the sample encodePayload compresses first to decide whether
// LZ4 is worth running on a large payload: it must save at least 1/32 of it.
const probeBytes = 16 << 10
