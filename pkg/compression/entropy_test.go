package compression

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"slices"
	"testing"
)

// skewedCodes returns n bytes of packed 4-bit codes drawn from a discretised
// Gaussian, as a quantized cache has: far from uniform, no long repeats.
func skewedCodes(n int, seed uint64) []byte {
	rng := rand.New(rand.NewPCG(seed, 5))
	b := make([]byte, n)
	code := func() byte {
		c := int(rng.NormFloat64() * 2.2)
		return byte(max(-8, min(7, c))) & 0xf
	}
	for i := range b {
		b[i] = code() | code()<<4
	}
	return b
}

func randomBytes(n int, seed uint64) []byte {
	rng := rand.New(rand.NewPCG(seed, 6))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

func TestPayloadEncoderPicksAndRoundTrips(t *testing.T) {
	text := bytes.Repeat([]byte("layer_0_key layer_0_value scales mins sink "), 2000)
	tests := []struct {
		name   string
		policy string
		raw    []byte
		want   []string // acceptable stages
	}{
		{"skewed codes, auto", EntropyAuto, skewedCodes(300<<10, 1), []string{EncodingHuff0, EncodingZstd}},
		{"small skewed codes, auto", EntropyAuto, skewedCodes(4000, 2), []string{EncodingHuff0, EncodingZstd}},
		{"random bytes, auto", EntropyAuto, randomBytes(100<<10, 3), []string{EncodingStored}},
		{"zeros, auto", EntropyAuto, make([]byte, 200<<10), []string{EncodingLZ4, EncodingZstd}},
		{"repetitive text, auto", EntropyAuto, text, []string{EncodingLZ4, EncodingZstd}},
		{"tiny, auto", EntropyAuto, skewedCodes(100, 4), []string{EncodingStored, EncodingLZ4}},
		{"empty, auto", EntropyAuto, nil, []string{EncodingStored}},
		{"skewed codes, lz4", EntropyLZ4, skewedCodes(100<<10, 5), []string{EncodingStored, EncodingLZ4}},
		{"zeros, none", EntropyNone, make([]byte, 10<<10), []string{EncodingStored}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := payloadEncoder{policy: tc.policy}
			data, enc := e.encode(tc.raw)
			if !slices.Contains(tc.want, enc) {
				t.Fatalf("stage %q, want one of %v", enc, tc.want)
			}
			if enc != EncodingStored && len(data) >= len(tc.raw) {
				t.Fatalf("stage %q keeps %d of %d bytes", enc, len(data), len(tc.raw))
			}
			if int64(len(tc.raw)) > int64(len(data))*maxExpansion+16 {
				t.Fatalf("%d bytes expand to %d, beyond the format's bound", len(data), len(tc.raw))
			}
			back := make([]byte, len(tc.raw))
			if err := decodePayload(data, enc, back); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(back, tc.raw) {
				t.Fatal("round trip changed the bytes")
			}
		})
	}
}

// With reuse (the file path), encode's results live in the encoder's arena:
// they must be the bytes a fresh encoder returns, stay intact while later
// payloads are encoded (the arena growing under them included), alias
// neither the input nor each other, and after a reset the arena's memory
// is used again instead of allocated.
func TestPayloadEncoderArena(t *testing.T) {
	raws := [][]byte{
		skewedCodes(300<<10, 11), // huff0, several blocks
		skewedCodes(4000, 12),    // huff0 kept from the trial that covered it whole
		randomBytes(100<<10, 13), // stored
		make([]byte, 200<<10),    // lz4 or zstd
		skewedCodes(100, 14),     // below the entropy threshold
		nil,                      // empty
	}
	for _, policy := range EntropyPolicies {
		t.Run(policy, func(t *testing.T) {
			fresh := payloadEncoder{policy: policy}
			arena := payloadEncoder{policy: policy, reuse: true}
			for round := range 2 {
				var want, got [][]byte
				for _, raw := range raws {
					w, wenc := fresh.encode(raw)
					g, genc := arena.encode(raw)
					if wenc != genc {
						t.Fatalf("round %d: stage %q with the arena, %q without", round, genc, wenc)
					}
					want, got = append(want, w), append(got, g)
				}
				for i := range raws {
					if !bytes.Equal(got[i], want[i]) {
						t.Fatalf("round %d: payload %d changed while later ones were encoded", round, i)
					}
					if len(got[i]) > 0 && len(raws[i]) > 0 && &got[i][0] == &raws[i][0] {
						t.Fatalf("round %d: payload %d aliases its input", round, i)
					}
				}
				before := cap(arena.arena)
				arena.reset()
				if round == 1 && before == 0 {
					t.Fatal("the arena held nothing")
				}
				if cap(arena.arena) != before {
					t.Fatalf("reset dropped the arena's memory (%d -> %d)", before, cap(arena.arena))
				}
			}
		})
	}
}

// TestHuff0Framing checks the block framing: several blocks, a raw block in
// the middle (random bytes huff0 cannot shrink), and a short last block.
// TestHuffShortcut checks that the histogram shortcut of the auto policy is
// sound (when it skips huff0's trial, huff0 really saves what the trial asks)
// and that it changes nothing: encode returns the bytes the trials would.
func TestHuffShortcut(t *testing.T) {
	narrow := func(n int, sigma float64, seed uint64) []byte {
		rng := rand.New(rand.NewPCG(seed, 7))
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(int(rng.NormFloat64() * sigma))
		}
		return b
	}
	tests := []struct {
		name     string
		data     []byte
		shortcut bool
	}{
		{"codes-16KiB", skewedCodes(16<<10, 3), true},
		{"codes-300KiB", skewedCodes(300<<10, 4), true},
		{"narrow-gauss", narrow(20000, 4, 5), true},
		{"wide-gauss", narrow(20000, 60, 6), false},
		{"random", randomBytes(20000, 7), false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sample := tc.data[:min(len(tc.data), sampleBytes)]
			bestSize := len(sample) - len(sample)/32
			est, pmax := order0Bytes(sample)
			got := huffClearlyWins(est, pmax, len(sample), bestSize)
			if got != tc.shortcut {
				t.Fatalf("huffClearlyWins = %v, want %v (est %.0f of %d bytes, pmax %.3f)", got, tc.shortcut, est, len(sample), pmax)
			}
			var e payloadEncoder
			if got {
				if out, ok := e.apply(EncodingHuff0, sample); !ok || len(out) >= bestSize {
					t.Fatalf("shortcut taken but huff0 gives %d bytes (ok %v), want < %d", len(out), ok, bestSize)
				}
			}
			e.policy = EntropyAuto
			out, enc := e.encode(tc.data)
			want := tc.data
			if enc != EncodingStored {
				var ref payloadEncoder
				w, ok := ref.apply(enc, tc.data)
				if !ok {
					t.Fatalf("encode picked %s, which cannot encode the payload", enc)
				}
				want = w
			}
			if !bytes.Equal(out, want) {
				t.Fatalf("encode (%s) returned %d bytes, not the %d bytes of a fresh %s encoding", enc, len(out), len(want), enc)
			}
		})
	}
}

func TestHuff0Framing(t *testing.T) {
	raw := slices.Concat(skewedCodes(huffBlock, 7), randomBytes(huffBlock, 8), skewedCodes(1000, 9))
	var e payloadEncoder
	data := append([]byte(nil), e.huffEncode(raw)...)
	if h := binary.LittleEndian.Uint32(data); h>>30 != huffBlockHuff {
		t.Fatalf("first block kind %d, want huff0", h>>30)
	}
	back := make([]byte, len(raw))
	if err := huffDecode(data, back); err != nil || !bytes.Equal(back, raw) {
		t.Fatalf("round trip: %v", err)
	}
}

// TestEntropyDecodeRejects feeds damaged payloads: every one is refused with
// ErrCorrupt, and none writes past the declared size (dst has no spare capacity).
func TestEntropyDecodeRejects(t *testing.T) {
	raw := skewedCodes(huffBlock+5000, 10)
	var e payloadEncoder
	huff := append([]byte(nil), e.huffEncode(raw)...)
	zst, _ := e.apply(EncodingZstd, raw)
	zst = append([]byte(nil), zst...)
	tests := []struct {
		name     string
		encoding string
		data     []byte
		size     int
	}{
		{"huff0 truncated", EncodingHuff0, huff[:len(huff)-1], len(raw)},
		{"huff0 trailing byte", EncodingHuff0, append(slices.Clone(huff), 0), len(raw)},
		{"huff0 declared size too large", EncodingHuff0, huff, len(raw) + 1},
		{"huff0 declared size too small", EncodingHuff0, huff, len(raw) - 1},
		{"huff0 empty", EncodingHuff0, nil, 10},
		{"huff0 unknown block kind", EncodingHuff0, func() []byte {
			d := slices.Clone(huff)
			d[3] |= 0xc0
			return d
		}(), len(raw)},
		{"huff0 raw block of the wrong length", EncodingHuff0, []byte{3, 0, 0, 0, 1, 2, 3}, 4},
		{"huff0 block length past the end", EncodingHuff0, []byte{0xff, 0xff, 0, 0x40, 1}, 4},
		{"zstd declares more than the index", EncodingZstd, zst, len(raw) - 1},
		{"zstd declares less than the index", EncodingZstd, zst, len(raw) + 1},
		{"zstd truncated", EncodingZstd, zst[:len(zst)/2], len(raw)},
		{"zstd garbage", EncodingZstd, randomBytes(100, 11), 1000},
		{"unknown stage", "brotli", zst, len(raw)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dst := make([]byte, tc.size, tc.size)
			if err := decodePayload(tc.data, tc.encoding, dst); !errors.Is(err, ErrCorrupt) {
				t.Fatalf("err = %v, want %v", err, ErrCorrupt)
			}
		})
	}
}

// FuzzDecodeEntropy decodes arbitrary bytes as huff0 and zstd payloads of an
// arbitrary declared size: an error or the exact size, never a panic.
func FuzzDecodeEntropy(f *testing.F) {
	var e payloadEncoder
	codes := skewedCodes(3000, 12)
	f.Add(slices.Clone(e.huffEncode(codes)), uint16(len(codes)), false)
	z, _ := e.apply(EncodingZstd, codes)
	f.Add(slices.Clone(z), uint16(len(codes)), true)
	f.Fuzz(func(t *testing.T, data []byte, size uint16, zstdStage bool) {
		enc := EncodingHuff0
		if zstdStage {
			enc = EncodingZstd
		}
		dst := make([]byte, size)
		_ = decodePayload(data, enc, dst)
	})
}

func BenchmarkEntropyStage(b *testing.B) {
	codes := skewedCodes(1<<20, 13)
	for _, enc := range []string{EncodingLZ4, EncodingHuff0, EncodingZstd} {
		var e payloadEncoder
		data, ok := e.apply(enc, codes)
		if !ok && enc != EncodingLZ4 {
			b.Fatalf("%s does not shrink skewed codes", enc)
		}
		data = slices.Clone(data)
		b.Run("encode/"+enc, func(b *testing.B) {
			b.SetBytes(int64(len(codes)))
			for b.Loop() {
				e.apply(enc, codes)
			}
		})
		if !ok {
			continue
		}
		b.Run("decode/"+enc, func(b *testing.B) {
			dst := make([]byte, len(codes))
			b.SetBytes(int64(len(codes)))
			for b.Loop() {
				if err := decodePayload(data, enc, dst); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkPayloadEncode measures the auto policy's whole choice (trials and
// final encoding) on payloads the size of one default tensor's codes (256
// KiB: the trials run on a sample) and of its scales (16 KiB: the trials run
// on the whole payload).
func BenchmarkPayloadEncode(b *testing.B) {
	for _, n := range []int{256 << 10, 16 << 10} {
		codes := skewedCodes(n, 17)
		b.Run(itoa(n>>10)+"KiB", func(b *testing.B) {
			e := payloadEncoder{policy: EntropyAuto}
			b.SetBytes(int64(n))
			for b.Loop() {
				if _, enc := e.encode(codes); enc != EncodingHuff0 {
					b.Fatalf("skewed codes stored as %s, want %s", enc, EncodingHuff0)
				}
			}
		})
	}
}
