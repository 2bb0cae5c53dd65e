"""Files on disk: the GGUF keys of a bundle, reading GGUF files, bundles, the shipped bundles."""
