"""Writers of ``sftrl sample``'s output, fed one batch at a time, complete or absent.

``NpzWriter``: one ``.npz`` holding ``x`` ``(N, *shape)`` float32, as ``np.savez`` writes it. The
batches go straight to a temporary ``.npy`` on disk, which is then stored (uncompressed) in the
zip, so the process never holds more than the batch it was given: 50,000 CIFAR-10-sized
samples are 614 MB as float32.

``PngFolderWriter``: a new folder of ``000000.png, 000001.png ...``, one 8-bit PNG per image
(grey for one channel, RGB for three), what external FID tools read. It is filled under a
hidden temporary name and renamed into place at the end.

Either leaves nothing at ``out`` unless every sample was written (an error, Ctrl-C or a full
disk removes the temporary file or folder and raises).
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import numpy as np

from sftrl.files import DiskFull, fsync_dir, out_of_space
from sftrl.pictures import to_uint8


class _Writer:
    out: Path
    expected: int
    written: int = 0

    def add(self, batch: np.ndarray) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def _discard(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self.written != self.expected:
            self._discard()
            raise ValueError(f"{self.written} samples were written of the {self.expected} announced; nothing kept")
        if exc_type is not None:
            self._discard()
            if isinstance(exc, OSError) and out_of_space(exc):
                raise DiskFull(self.out, exc) from exc
            return
        try:
            self._finish()
        except BaseException as err:
            self._discard()
            if isinstance(err, OSError) and out_of_space(err):
                raise DiskFull(self.out, err) from err
            raise


class NpzWriter(_Writer):
    """``out`` ``.npz`` with ``x`` ``(n, *shape)`` float32, written batch by batch."""

    def __init__(self, out: Path, n: int, shape: tuple[int, ...]):
        self.out, self.expected, self.shape = Path(out), int(n), tuple(shape)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._npy = self.out.with_name(f".{self.out.name}.{os.getpid()}.npy.tmp")
        self._zip = self.out.with_name(f".{self.out.name}.{os.getpid()}.zip.tmp")
        self._file = open(self._npy, "wb", buffering=0)  # each batch goes to the disk as it comes
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                  "shape": (self.expected, *self.shape)}
        np.lib.format.write_array_header_2_0(self._file, header)

    def add(self, batch: np.ndarray) -> None:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if tuple(batch.shape[1:]) != self.shape or self.written + len(batch) > self.expected:
            raise ValueError(f"batch of shape {batch.shape} does not fit ({self.written} of {self.expected} "
                             f"samples of shape {self.shape} written)")
        data = batch.data.cast("B")  # the batch's bytes, no copy
        while data:  # an unbuffered write may take fewer bytes than it was given
            data = data[self._file.write(data) :]
        self.written += len(batch)

    def _finish(self) -> None:
        self._file.close()
        with zipfile.ZipFile(self._zip, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            archive.write(self._npy, arcname="x.npy")  # streamed from disk in chunks
        with open(self._zip, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self._zip, self.out)
        fsync_dir(self.out.parent)
        self._npy.unlink(missing_ok=True)

    def _discard(self) -> None:
        self._file.close()
        self._npy.unlink(missing_ok=True)
        self._zip.unlink(missing_ok=True)


class PngFolderWriter(_Writer):
    """A new folder ``out`` of ``n`` PNGs named by their index (zero-padded to at least 6 digits)."""

    def __init__(self, out: Path, n: int):
        self.out, self.expected = Path(out), int(n)
        if self.out.exists():
            raise ValueError(f"'{self.out}' already exists; the PNGs go into a new folder")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.out.with_name(f".{self.out.name}.{os.getpid()}.tmp")
        self._tmp.mkdir()
        self._digits = max(6, len(str(self.expected - 1)))

    def add(self, batch: np.ndarray) -> None:
        from PIL import Image  # Pillow is a dependency of matplotlib

        if batch.ndim != 4 or batch.shape[1] not in (1, 3):
            raise ValueError(f"PNGs need images (B, C, H, W) with C in (1, 3), got {batch.shape}")
        pixels = to_uint8(batch).transpose(0, 2, 3, 1)  # (B, H, W, C) 0..255
        for image in pixels:
            grey_or_rgb = image[:, :, 0] if image.shape[-1] == 1 else image
            Image.fromarray(grey_or_rgb).save(self._tmp / f"{self.written:0{self._digits}d}.png", format="PNG")
            self.written += 1

    def _finish(self) -> None:
        fsync_dir(self._tmp)
        os.rename(self._tmp, self.out)  # never merges into a folder that appeared meanwhile
        fsync_dir(self.out.parent)

    def _discard(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)
