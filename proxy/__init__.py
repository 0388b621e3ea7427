"""byok-proxy data plane: forwarding, auth, crypto, store, usage log and CLI."""
