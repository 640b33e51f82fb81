//go:build !(goexperiment.simd && amd64)

package compression

import "github.com/kv-cache-p2p/validation/pkg/safetensors"

// haveSIMD is false in builds without GOEXPERIMENT=simd on amd64: every
// encoder runs its scalar path.
const haveSIMD = false

func encodeRowsSIMD(*rowJob, *tensorStats) bool { return false }

func decodeRowsSIMD(*rowDecodeJob) bool { return false }

func decodeChannelsSIMD(*rowDecodeJob, int, []float32) bool { return false }

func encodeChannelsSIMD(*channelJob, *tensorStats) bool { return false }

func dequantizeTensorSIMD([]byte, []uint16, int, safetensors.DType, []byte) bool { return false }
