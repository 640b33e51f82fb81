module github.com/kv-cache-p2p/validation

go 1.24

require github.com/pierrec/lz4/v4 v4.1.33

require github.com/klauspost/compress v1.19.2
