"""Persistence: the fsspec store (content-addressed outputs, manifests written last), stage leases, the
safetensors + JSON checkpoint format, and lineage / garbage collection over the manifests."""
