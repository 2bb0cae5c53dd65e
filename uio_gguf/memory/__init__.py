"""UIO memory at run time: the encoder compresses segments into KV slots; a Session decodes over them."""
