"""qemu-io as the TLS tests drive it (certificates or pre-shared keys)."""

from __future__ import annotations

from tools.harness import run


def qemu_io_tls(obj: str, opts: str, cmd: str, check: bool = True) -> tuple[int, str]:
    """Run one qemu-io command through the TLS credentials object ``obj`` (``--object``)
    on ``opts`` (``--image-opts``), read-only for a read: (0 or 1, output). qemu-io
    exits 0 even when a command fails, so its message decides."""
    ro = ["-r"] if cmd.startswith("read") else []  # qemu-io opens read-write by default
    r = run("qemu-io", *ro, "--object", obj, "--image-opts", opts, "-c", cmd, check=check)
    out = (r.stdout + r.stderr).decode(errors="replace")
    failed = r.returncode != 0 or "failed" in out.lower() or "error" in out.lower()
    return (1 if failed else 0), out
