package compression

import "github.com/kv-cache-p2p/validation/pkg/safetensors"

// PartBytes splits a container's size by what its bytes hold, as stored
// (after the entropy stage): the sum of the fields is the file's size.
type PartBytes struct {
	// Codes, Scales, Mins and Sink are the payloads of quantized tensors.
	Codes  int64 `json:"codes"`
	Scales int64 `json:"scales"`
	Mins   int64 `json:"mins"`
	Sink   int64 `json:"sink"`
	// Bases is the projection bases and means embedded in projected entries.
	Bases int64 `json:"bases,omitempty"`
	// Raw is the payloads of tensors kept losslessly (mode "stored").
	Raw int64 `json:"raw"`
	// Header is the safetensors header with the container's index: the rest of the file.
	Header int64 `json:"header"`
}

// Stages counts the payloads of a container by entropy stage ("stored",
// "lz4", "huff0", "zstd"), and their stored bytes.
type Stages map[string]StageUse

// StageUse is how many payloads one stage encoded and how many bytes they take.
type StageUse struct {
	Payloads    int   `json:"payloads"`
	StoredBytes int64 `json:"stored_bytes"`
	RawBytes    int64 `json:"raw_bytes"`
}

// partsOf tallies a container's payloads by part and by stage.
func partsOf(entries []Entry, tensors []safetensors.Tensor, fileSize int64) (PartBytes, Stages) {
	size := make(map[string]int64, len(tensors))
	for _, t := range tensors {
		size[t.Name] = t.ByteLen() // Data may already be spilled to disk (CompressFile)
	}
	var parts PartBytes
	stages := Stages{}
	total := int64(0)
	for _, e := range entries {
		for _, pp := range []struct {
			p   *Payload
			dst *int64
		}{{e.Codes, &parts.Codes}, {e.Scales, &parts.Scales}, {e.Mins, &parts.Mins}, {e.SinkP, &parts.Sink}, {e.Raw, &parts.Raw}, {basisOf(e), &parts.Bases}, {meanOf(e), &parts.Bases}} {
			if pp.p == nil {
				continue
			}
			n := size[pp.p.Tensor]
			*pp.dst += n
			total += n
			u := stages[pp.p.Encoding]
			u.Payloads++
			u.StoredBytes += n
			u.RawBytes += pp.p.RawBytes
			stages[pp.p.Encoding] = u
		}
	}
	parts.Header = fileSize - total
	return parts, stages
}

// bitsPer expresses each part in bits per quantized element (n elements).
func (p PartBytes) bitsPer(n int64) map[string]float64 {
	b := func(v int64) float64 { return 8 * float64(v) / float64(n) }
	m := map[string]float64{"codes": b(p.Codes), "scales": b(p.Scales), "mins": b(p.Mins), "sink": b(p.Sink),
		"raw": b(p.Raw), "header": b(p.Header), "total": b(p.Codes + p.Scales + p.Mins + p.Sink + p.Raw + p.Bases + p.Header)}
	if p.Bases > 0 {
		m["bases"] = b(p.Bases)
	}
	return m
}

func basisOf(e Entry) *Payload {
	if e.Projection == nil {
		return nil
	}
	return e.Projection.Basis
}

func meanOf(e Entry) *Payload {
	if e.Projection == nil {
		return nil
	}
	return e.Projection.Mean
}
