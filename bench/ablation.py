"""Where byok-proxy's CPU per request goes beyond the reference: an experiment, not a test.

    python -m bench.ablation [--seconds 5] [--rounds 3]

Starts the fake upstream, the reference (`bench/reference.py`) and several
`byok-proxy serve` processes that differ only in what per-request work is switched
off, by patching the product at start-up (a `sitecustomize` module on the variant's
PYTHONPATH; the product has no such switches): the full product path; then without
spend control (no policy on the tenant), without the usage line, without metrics,
with the tenant's key decrypted once and remembered (a shortcut the product must
not take: decrypting at request time is a requirement), without reading the request's
JSON, without parsing the response's usage, on uvicorn's own protocol class instead
of the hardened one (`proxy.server`), and with all of these off together: what is
left is authentication, the upstream call and relaying the answer. Each is driven
at c=64 with wrk, in rounds that rotate who goes first, and its CPU ms per request
is printed as a ratio to the reference's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from bench.__main__ import (
    LUA,
    POLICY,
    Processes,
    cpu_seconds,
    rotated,
    wrk,
)

# The patches a variant may ask for in BYOK_ABLATE (comma-separated).
SITECUSTOMIZE = """
import os

_off = set(filter(None, os.environ.get("BYOK_ABLATE", "").split(",")))
if _off:
    if "usage" in _off:
        import proxy.usage_sink

        proxy.usage_sink.UsageLog.write = lambda self, record: None
    if "metrics" in _off:
        import proxy.metrics

        proxy.metrics.Metrics.observe = lambda self, record: None
    if "decrypt" in _off:
        import proxy.security

        _decrypt = proxy.security.Keyring.decrypt
        _memo = {}

        def _remembered(self, ciphertext, tenant_id):
            if ciphertext not in _memo:
                _memo[ciphertext] = _decrypt(self, ciphertext, tenant_id)
            return _memo[ciphertext]

        proxy.security.Keyring.decrypt = _remembered
    if "json" in _off:  # the request body's model/stream/usage fields: not read
        import proxy.forward

        async def _not_inspected(self, body, request, scope, record):
            return body, False, None

        proxy.forward.Forwarder._inspect_json = _not_inspected
    if "response" in _off:  # the response body's usage: not parsed
        import proxy.forward

        class _NoUsage:
            pending = False

            def __init__(self, encoding):
                pass

            def feed(self, block):
                pass

            def usage(self):
                return None

            seen = usage

        proxy.forward.BodyUsage = _NoUsage
    if "protocol" in _off:  # uvicorn's own httptools protocol, without our head limits
        import proxy.server

        proxy.server.protocol_class = lambda *args, **kwargs: "httptools"
"""

VARIANTS: dict[str, tuple[str, bool]] = {  # name -> (BYOK_ABLATE, policy on the tenant)
    "full product path": ("", True),
    "  without spend control": ("", False),
    "  without the usage line": ("usage", True),
    "  without metrics": ("metrics", True),
    "  key decrypted once": ("decrypt", True),
    # Without the request's model, the allow-list would refuse every request: no policy.
    "  request JSON not read (no policy)": ("json", False),
    "  response usage not parsed": ("response", True),
    "  uvicorn's own protocol": ("protocol", True),
    "  all of the above off": ("usage,metrics,decrypt,json,response,protocol", False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="byok-ablation-"))
    site = work / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    script = work / "post.lua"
    script.write_text(LUA)
    procs = Processes(work)
    saved = {k: os.environ.get(k) for k in ("BYOK_ABLATE", "PYTHONPATH")}
    try:
        upstream = procs.start_upstream()
        reference = procs.start_reference(upstream)
        targets: dict[str, tuple[str, int, str | None]] = {
            "reference": (reference[0], reference[1], None)
        }
        for i, (name, (off, policed)) in enumerate(VARIANTS.items()):
            os.environ["BYOK_ABLATE"] = off
            os.environ["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(site), saved["PYTHONPATH"]])
            )
            proxy = procs.start_proxy(upstream, f"variant{i}", POLICY if policed else None)
            targets[name] = (proxy.url, proxy.pid, proxy.key)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for url, _pid, key in targets.values():  # warm up
            wrk(url, key, 8, 1, script)
        cpu: dict[str, list[float]] = {name: [] for name in targets}
        for i in range(args.rounds):
            for name in rotated(list(targets), i):
                url, pid, key = targets[name]
                before = cpu_seconds(pid)
                result = wrk(url, key, 64, args.seconds, script)
                cpu[name].append(
                    (cpu_seconds(pid) - before) * 1000 / max(1.0, result["rps"] * args.seconds)
                )
    finally:
        procs.stop()
        shutil.rmtree(work, ignore_errors=True)
    ref = statistics.median(cpu["reference"])
    print(f"{'CPU per request, c=64':32s}  {'ms':>6s}  vs reference")
    for name, values in cpu.items():
        ms = statistics.median(values)
        print(f"{name:32s}  {ms:6.3f}  x{ms / ref:.2f}")


if __name__ == "__main__":
    main()
