"""``sftrl weights inception``: fetch the FID Inception's weights once, on purpose.

A run never downloads anything; this command is the one place sftrl reaches the network, and
only when a person runs it. The file is streamed to a temporary name beside its destination,
its SHA-256 checked against the prefix in its published name (``...-6726825d.pth``, the torch.hub
convention) and loaded into the network once before it is renamed into place, so the cache
holds a whole, working file or nothing.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from sftrl.files import DiskFull, fsync_dir, out_of_space
from sftrl.metrics.inception import INCEPTION_SHA256_PREFIX, INCEPTION_URL, INCEPTION_WEIGHTS_FILE
from sftrl.progress import Progress

CHUNK = 1 << 20
TIMEOUT_S = 60


def fetch_inception(cache_dir: Path, *, url: str | None = None, progress: bool = True,
                    sha256_prefix: str = INCEPTION_SHA256_PREFIX) -> Path:
    """``cache_dir/weights-inception-2015-12-05-6726825d.pth``, fetched from ``url`` (default
    the published one) unless a working copy is there already. Raises ``ValueError`` (nothing
    written) when the fetch fails, the checksum differs or the file is not the network's weights."""
    from sftrl.metrics.inception import load_fid_inception

    cache_dir = Path(cache_dir)
    path = cache_dir / INCEPTION_WEIGHTS_FILE
    if path.is_file():
        load_fid_inception(path)  # a damaged copy says so (ValueError naming it)
        return path
    source = url or INCEPTION_URL
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        try:
            response = urllib.request.urlopen(source, timeout=TIMEOUT_S)  # noqa: S310 - a person asked for it
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise ValueError(f"could not fetch the Inception weights from {source} ({err}); nothing was written. "
                             "Without internet here, copy the file from a machine that has it and pass "
                             "--url file:///path/to/it, or set trainer.fid_weights to it") from None
        total = int(response.headers.get("Content-Length") or 0)
        with response, open(tmp, "wb") as f, Progress(total or 1, "fetch inception", unit="B",
                                                       enabled=progress) as bar:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
        if not digest.hexdigest().startswith(sha256_prefix):
            raise ValueError(f"the file fetched from {source} has SHA-256 {digest.hexdigest()[:16]}..., not the "
                             f"published {sha256_prefix}...; nothing was written")
        load_fid_inception(tmp)
        os.replace(tmp, path)
        fsync_dir(cache_dir)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and out_of_space(err):
            raise DiskFull(path, err) from err
        raise
    return path
