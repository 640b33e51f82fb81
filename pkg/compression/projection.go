package compression

import (
	"errors"
	"fmt"
	"math"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// This file holds the low-rank projection (docs/format.md section 10): per KV
// head, a tensor's rows x (length D) become r coefficients c = (x − mean)·B,
// B being a D×r basis calibrated by PCA (python -m validation.calibrate);
// the coefficients are quantized like any tensor, and the decoder rebuilds
// x̂ = ĉ·Bᵀ + mean. The sums run in a fixed order with every product rounded
// to float32, so the torch reference (validation/reference_lowrank.py)
// reproduces the reconstruction bit for bit.

// ErrProjection marks projection bases that cannot be used: a bases file or
// container entry with wrong shapes, non-finite values, entries beyond ±1, a
// rank outside [1, head_dim], or bases that do not fit the cache's tensors.
// It is an invalid input (exit 3).
var ErrProjection = errors.New("compression: invalid projection bases")

// Payload suffixes of a projected tensor's basis and mean.
const (
	SuffixBasis = ".basis"
	SuffixMean  = ".mean"
)

// maxBasisElements bounds heads × head_dim × rank of one basis (64 Mi
// elements, 256 MiB as float32): far beyond any real model, small enough that
// a hostile file cannot make a decoder allocate without bound.
const maxBasisElements = 1 << 26

// basisFits reports whether heads × dim × rank is at most maxBasisElements,
// computed without wrapping whatever the (non-negative) inputs.
func basisFits(heads, dim, rank int64) bool {
	if heads > maxBasisElements || dim > maxBasisElements || rank > maxBasisElements {
		return false
	}
	hd := heads * dim // at most 2^52
	return hd <= maxBasisElements && hd*rank <= maxBasisElements
}

// ProjectionBasis is the projection of one tensor (layer_{i}_key or
// layer_{i}_value): for each of Heads KV heads a Dim × Rank matrix whose
// columns are the principal directions, and a mean of Dim values.
type ProjectionBasis struct {
	Heads, Dim, Rank int
	// DType is how the basis and mean are stored: F16 or F32.
	DType safetensors.DType
	// Basis is [Heads][Dim][Rank] and Mean [Heads][Dim], as float32.
	Basis, Mean []float32
	// basisT is Basis transposed per head, [Heads][Rank][Dim], for decoding.
	basisT []float32
	// basisRaw and meanRaw are the stored little-endian bytes.
	basisRaw, meanRaw []byte
}

// NewProjectionBasis checks and decodes a basis stored as dtype (F16 or F32):
// basisRaw holds heads × dim × rank elements ([head][dim][rank]), meanRaw
// heads × dim. Every element must be finite and every basis element within
// [−1, 1] (a column of an orthonormal basis cannot hold more), which keeps
// every reconstruction finite whatever the codes.
func NewProjectionBasis(heads, dim, rank int, dtype safetensors.DType, basisRaw, meanRaw []byte) (*ProjectionBasis, error) {
	if dtype != safetensors.F16 && dtype != safetensors.F32 {
		return nil, fmt.Errorf("%w: dtype must be one of [F16 F32], got %q", ErrProjection, dtype)
	}
	if heads < 1 || dim < 1 || rank < 1 || rank > dim {
		return nil, fmt.Errorf("%w: heads %d, head_dim %d, rank %d (want heads >= 1 and 1 <= rank <= head_dim)", ErrProjection, heads, dim, rank)
	}
	if !basisFits(int64(heads), int64(dim), int64(rank)) {
		return nil, fmt.Errorf("%w: %d heads x %d x %d exceeds %d basis elements", ErrProjection, heads, dim, rank, maxBasisElements)
	}
	w := dtype.Bits() / 8
	nb, nm := heads*dim*rank, heads*dim
	if len(basisRaw) != nb*w || len(meanRaw) != nm*w {
		return nil, fmt.Errorf("%w: basis of %d bytes and mean of %d bytes; heads %d, head_dim %d, rank %d as %s need %d and %d",
			ErrProjection, len(basisRaw), len(meanRaw), heads, dim, rank, dtype, nb*w, nm*w)
	}
	b := &ProjectionBasis{Heads: heads, Dim: dim, Rank: rank, DType: dtype, Basis: make([]float32, nb), Mean: make([]float32, nm),
		basisRaw: basisRaw, meanRaw: meanRaw}
	if err := safetensors.DecodeFloat32(dtype, basisRaw, b.Basis); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrProjection, err)
	}
	if err := safetensors.DecodeFloat32(dtype, meanRaw, b.Mean); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrProjection, err)
	}
	for i, v := range b.Basis {
		if !(v >= -1 && v <= 1) {
			return nil, fmt.Errorf("%w: basis element %d is %g (want a finite value in [-1, 1])", ErrProjection, i, v)
		}
	}
	for i, v := range b.Mean {
		if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
			return nil, fmt.Errorf("%w: mean element %d is %g", ErrProjection, i, v)
		}
	}
	b.basisT = make([]float32, nb)
	for h := range heads {
		src, dst := b.Basis[h*dim*rank:(h+1)*dim*rank], b.basisT[h*dim*rank:(h+1)*dim*rank]
		for j := range dim {
			for k := range rank {
				dst[k*dim+j] = src[j*rank+k]
			}
		}
	}
	return b, nil
}

// fits checks that the basis applies to a tensor of this shape: rank >= 2,
// last axis head_dim, and one basis for every head (the axis before the
// sequence) or a single one for all.
func (b *ProjectionBasis) fits(shape []int64) error {
	n := len(shape)
	if n < 2 || shape[n-1] != int64(b.Dim) {
		return fmt.Errorf("%w: a basis for head_dim %d does not fit shape %v", ErrProjection, b.Dim, shape)
	}
	if b.Heads != 1 && (n < 3 || shape[n-3] != int64(b.Heads)) {
		return fmt.Errorf("%w: a basis for %d heads does not fit shape %v (heads are the axis before the sequence)", ErrProjection, b.Heads, shape)
	}
	return nil
}

// head returns the basis index of outer block o of a tensor.
func (b *ProjectionBasis) head(o int) int { return o % b.Heads }

// project writes the coefficients of the rows x ([rows][Dim], head h) into c
// ([rows][Rank]): c_k = Σ_j float32(float32(x_j − m_j) · B_jk), summed from
// j = 0 upwards into a float32 starting at +0, each product rounded (never fused).
func (b *ProjectionBasis) project(h int, x, c []float32) {
	d, r := b.Dim, b.Rank
	basis, mean := b.Basis[h*d*r:(h+1)*d*r], b.Mean[h*d:(h+1)*d]
	for row := 0; row < len(x)/d; row++ {
		acc := c[row*r : (row+1)*r : (row+1)*r]
		clear(acc)
		xr := x[row*d : (row+1)*d : (row+1)*d]
		for j, xj := range xr {
			dj := xj - mean[j]
			bj := basis[j*r : (j+1)*r : (j+1)*r]
			for k, v := range bj {
				acc[k] += float32(dj * v)
			}
		}
	}
}

// reconstruct writes the rows rebuilt from coefficients c ([rows][Rank],
// head h) into y ([rows][Dim]): y_j = (Σ_k float32(c_k · B_jk)) + m_j, summed
// from k = 0 upwards into a float32 starting at +0, each product rounded,
// the mean added last.
func (b *ProjectionBasis) reconstruct(h int, c, y []float32) {
	d, r := b.Dim, b.Rank
	bt, mean := b.basisT[h*d*r:(h+1)*d*r], b.Mean[h*d:(h+1)*d]
	for row := 0; row < len(c)/r; row++ {
		out := y[row*d : (row+1)*d : (row+1)*d]
		clear(out)
		for k, ck := range c[row*r : (row+1)*r] {
			col := bt[k*d : (k+1)*d : (k+1)*d]
			for j, v := range col {
				out[j] += float32(ck * v)
			}
		}
		for j := range out {
			out[j] += mean[j]
		}
	}
}

// ProjectionSet is the bases a preset names, by tensor name; tensors without
// one are quantized directly (an identity layer).
type ProjectionSet struct {
	// File is the bases file's name as the preset gives it, SHA256 its hex SHA-256.
	File   string
	SHA256 string
	// Bases maps layer_{i}_key / layer_{i}_value to its basis.
	Bases map[string]*ProjectionBasis
}

// lookup returns the basis of tensor name, or nil.
func (s *ProjectionSet) lookup(name string) *ProjectionBasis {
	if s == nil {
		return nil
	}
	return s.Bases[name]
}

// ProjectionRef is what the codec record says about the bases a container
// was written with (informational: each entry embeds its own basis).
type ProjectionRef struct {
	File   string `json:"file"`
	SHA256 string `json:"sha256"`
	// Tensors counts the projected tensors' bases in the set.
	Tensors int `json:"tensors"`
}

func (s *ProjectionSet) ref() *ProjectionRef {
	if s == nil {
		return nil
	}
	return &ProjectionRef{File: s.File, SHA256: s.SHA256, Tensors: len(s.Bases)}
}
