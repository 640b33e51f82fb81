package compression

import "testing"

// TestNibbleWord checks the 8 codes nibbleWord returns at every nibble
// offset of buffers of several lengths against one code at a time, the
// zero padding past the end included.
func TestNibbleWord(t *testing.T) {
	for _, n := range []int{1, 4, 5, 8, 9, 17, 64} {
		src := make([]byte, n)
		for i := range src {
			src[i] = byte(i*37 + 11)
		}
		for at := 0; at < 2*n; at++ {
			var want uint32
			for k := range 8 {
				if j := at + k; j < 2*n {
					want |= uint32(src[j/2]>>(4*(j%2))&0xf) << (4 * k)
				}
			}
			if got := nibbleWord(src, at); got != want {
				t.Fatalf("len %d, at %d: %08x, want %08x", n, at, got, want)
			}
		}
	}
}
