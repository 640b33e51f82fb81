module github.com/kv-cache-p2p/validation

go 1.26.8

require github.com/pierrec/lz4/v4 v4.1.33
