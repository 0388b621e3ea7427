"""byok-proxy benchmark: `python -m bench` (see README, Performance)."""
