package compression

import "math"

// signSeed seeds the fixed random signs of the Hadamard rotation ("kv-compr").
const signSeed = 0x6b762d636f6d7072

// splitmix64 returns the i-th output (i from 0) of the SplitMix64 generator seeded with seed.
func splitmix64(seed uint64, i uint64) uint64 {
	z := seed + (i+1)*0x9e3779b97f4a7c15
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

// hadamardBlock is the rotation's block length for a last dimension d: the
// largest power of two dividing d.
func hadamardBlock(d int) int { return d & -d }

// rotation holds the constants of the Walsh–Hadamard rotation of one block length.
type rotation struct {
	n     int
	scale float32   // float32(1 / sqrt(n))
	signs []float32 // ±1: element j of every block is multiplied by signs[j]
}

func newRotation(n int) *rotation {
	r := &rotation{n: n, scale: float32(1 / math.Sqrt(float64(n))), signs: make([]float32, n)}
	for j := range r.signs {
		r.signs[j] = 1
		if splitmix64(signSeed, uint64(j))&1 == 1 {
			r.signs[j] = -1
		}
	}
	return r
}

// fwht is the unnormalised fast Walsh–Hadamard transform of v (len a power of
// two), in the butterfly order the format specifies: for h = 1, 2, 4, ...,
// each pair (j, j+h) inside a block of 2h becomes (a+b, a−b).
func fwht(v []float32) {
	if len(v) >= 2 {
		for i := 0; i+1 < len(v); i += 2 {
			a, b := v[i], v[i+1]
			v[i], v[i+1] = a+b, a-b
		}
	}
	fwhtFrom(v, 2)
}

// fwhtFrom runs the butterfly stages h, 2h, ... of fwht (h a power of two).
func fwhtFrom(v []float32, h int) {
	n := len(v)
	if h == 2 && n >= 4 { // unrolled: the inner loop would be too short to pay for itself
		for i := 0; i+3 < n; i += 4 {
			q := v[i : i+4 : i+4]
			a0, a1, b0, b1 := q[0], q[1], q[2], q[3]
			q[0], q[1], q[2], q[3] = a0+b0, a1+b1, a0-b0, a1-b1
		}
		h = 4
	}
	for ; h < n; h *= 2 {
		for i := 0; i < n; i += 2 * h {
			a, b := v[i:i+h:i+h], v[i+h:i+2*h:i+2*h]
			for j := range a {
				x, y := a[j], b[j]
				a[j], b[j] = x+y, x-y
			}
		}
	}
}

// forward rotates every block of n consecutive elements of v in place:
// v ← scale · H · (signs ⊙ v). The sign flips are exact, so they are folded
// into the first butterfly stage when n >= 2.
func (r *rotation) forward(v []float32) {
	for i := 0; i+r.n <= len(v); i += r.n {
		blk := v[i : i+r.n : i+r.n]
		if r.n >= 2 {
			signs := r.signs[:r.n:r.n]
			for j := 0; j+1 < len(blk); j += 2 {
				a, b := blk[j]*signs[j], blk[j+1]*signs[j+1]
				blk[j], blk[j+1] = a+b, a-b
			}
			fwhtFrom(blk, 2)
		} else {
			blk[0] *= r.signs[0]
		}
		for j := range blk {
			blk[j] *= r.scale
		}
	}
}

// inverse undoes forward: v ← signs ⊙ (scale · H · v).
func (r *rotation) inverse(v []float32) {
	for i := 0; i+r.n <= len(v); i += r.n {
		blk := v[i : i+r.n : i+r.n]
		fwht(blk)
		signs := r.signs[:len(blk):len(blk)]
		for j := range blk {
			blk[j] = blk[j] * r.scale * signs[j]
		}
	}
}
