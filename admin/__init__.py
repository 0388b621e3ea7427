"""byok-proxy control plane: tenant and key management API, audit."""
