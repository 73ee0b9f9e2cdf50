"""Our own .proto files for containerd 1.6's messages, and the modules generated from them."""
