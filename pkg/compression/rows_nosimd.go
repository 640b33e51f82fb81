//go:build !(goexperiment.simd && amd64)

package compression

// haveSIMD is false in builds without GOEXPERIMENT=simd on amd64: every
// encoder runs its scalar path.
const haveSIMD = false

func encodeRowsSIMD(*rowJob, *tensorStats) bool { return false }

func decodeRowsSIMD(*rowDecodeJob) bool { return false }

func decodeChannelsSIMD(*rowDecodeJob, int, []float32) bool { return false }

func encodeChannelsSIMD(*channelJob, *tensorStats) bool { return false }
