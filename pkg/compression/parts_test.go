package compression

import (
	"bytes"
	"testing"

	"github.com/kv-cache-p2p/validation/pkg/safetensors"
)

// TestEntropyStageKeepsTheReconstruction compresses the same cache under each
// entropy policy: the restored tensors are identical, auto is the smallest,
// and the parts add up to the file's size.
func TestEntropyStageKeepsTheReconstruction(t *testing.T) {
	src := kvCache(t, 2, 2, 256, 64, safetensors.F16, 21)
	for _, base := range []struct {
		name string
		cfg  Config
	}{{"default", DefaultConfig()}, {"seed", SeedConfig()}, {"asym-sink", Config{GroupSize: 32, Scheme: SchemeAsym, Sink: 2}}} {
		t.Run(base.name, func(t *testing.T) {
			var restored [][]byte
			sizes := map[string]int64{}
			for _, policy := range EntropyPolicies {
				cfg := withEntropy(base.cfg, policy)
				res, err := Compress(src, cfg)
				if err != nil {
					t.Fatal(err)
				}
				p := res.Parts
				if sum := p.Codes + p.Scales + p.Mins + p.Sink + p.Raw + p.Header; sum != res.FileSize || p.Header <= 0 {
					t.Fatalf("%s: parts %+v sum to %d, file is %d", policy, p, sum, res.FileSize)
				}
				if (p.Mins > 0) != (cfg.scheme() == SchemeAsym) || (p.Sink > 0) != (cfg.Sink > 0) {
					t.Fatalf("%s: parts %+v do not match the plan", policy, p)
				}
				sizes[policy] = res.FileSize
				r, err := Decompress(asContainer(t, res), 1)
				if err != nil {
					t.Fatal(err)
				}
				var all []byte
				for _, rt := range r.Tensors {
					all = append(all, rt.Data...)
				}
				restored = append(restored, all)
			}
			for i := 1; i < len(restored); i++ {
				if !bytes.Equal(restored[0], restored[i]) {
					t.Fatalf("policy %s restores different bytes than %s", EntropyPolicies[i], EntropyPolicies[0])
				}
			}
			if !(sizes[EntropyAuto] < sizes[EntropyLZ4] && sizes[EntropyLZ4] <= sizes[EntropyNone]) {
				t.Fatalf("sizes %v: want auto < lz4 <= none", sizes)
			}
		})
	}
}
