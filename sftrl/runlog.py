"""The run log, ``metrics.jsonl``: one JSON object per line, each with an ``iteration``.

The JSONL is the source of truth of a run's curves; ``sinks`` (a TensorBoard logger with
``scalars(iteration, record)``) receive a copy of every record.

Every append is a whole line or nothing: a write the disk cannot take is cut back before the
error goes up. A line torn by something sftrl could not cut back (a kill during the write, a
power cut) or damaged by hand is found by :meth:`MetricsLog.repair` when a run resumes: it is
cut, said so, and kept in ``metrics.jsonl.dropped`` beside the log, as are the lines written
after the checkpoint the run resumes from. Nothing a run logged is ever deleted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftrl.files import DiskFull, out_of_space, write_text_atomic

DROPPED_SUFFIX = ".dropped"


@dataclass
class ParsedLog:
    """The lines of a log: ``records`` (line number, record) that parse, ``bad`` (line number,
    text) that do not, and whether the last line lacks its newline (``torn``)."""

    records: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    bad: list[tuple[int, str]] = field(default_factory=list)
    torn: bool = False


def parse_log(text: str) -> ParsedLog:
    """Split a metrics.jsonl's text into records and bad lines (not a JSON object with an
    ``iteration``). Blank lines are neither."""
    parsed = ParsedLog(torn=bool(text) and not text.endswith("\n"))
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and "iteration" in record:
            parsed.records.append((number, record))
        else:
            parsed.bad.append((number, line))
    return parsed


class MetricsLog:
    """Append-only JSONL at ``path`` (see the module doc)."""

    def __init__(self, path: str | os.PathLike, sinks: tuple = ()):
        self.path = Path(path)
        self.sinks = sinks

    @property
    def dropped_path(self) -> Path:
        return self.path.with_name(self.path.name + DROPPED_SUFFIX)

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line, whole or not at all (raises :class:`DiskFull` when the
        disk is full, the log as it was), then hand it to the sinks."""
        _append_whole(self.path, (json.dumps(record, allow_nan=True) + "\n").encode())
        for sink in self.sinks:
            sink.scalars(record["iteration"], record)

    def read(self) -> list[dict[str, Any]]:
        """The records, in file order; lines that do not parse are skipped."""
        if not self.path.is_file():
            return []
        return [record for _, record in parse_log(self.path.read_text(errors="replace")).records]

    def repair(self, last_iteration: int) -> list[str]:
        """Before a resume from the checkpoint of ``last_iteration``: keep the records up to it,
        set aside torn or damaged lines and the records after it (into ``metrics.jsonl.dropped``),
        and return what was done, one sentence each, for the user (empty when nothing was)."""
        if not self.path.is_file():
            return []
        text = self.path.read_text(errors="replace")
        parsed = parse_log(text)
        later = [(n, r) for n, r in parsed.records if _iteration(r) > last_iteration]
        if not parsed.bad and not later and not parsed.torn:
            return []
        lines = text.splitlines()
        last = len(lines)
        notes = []
        torn = [n for n, _ in parsed.bad if n == last]
        damaged = [n for n, _ in parsed.bad if n != last]
        if torn:
            notes.append(f"{self.path}: cut a torn last line (line {last}, a write that did not finish)")
        if damaged:
            shown = ", ".join(map(str, damaged[:5])) + (" ..." if len(damaged) > 5 else "")
            notes.append(f"{self.path}: set aside {len(damaged)} damaged line(s) (line {shown})")
        if later:
            notes.append(f"{self.path}: set aside {len(later)} record(s) written after iteration {last_iteration}, "
                         "the checkpoint this run resumes from")
        dropped = sorted({n for n, _ in parsed.bad} | {n for n, _ in later})
        with self.dropped_path.open("a", encoding="utf-8") as f:
            f.writelines(lines[n - 1] + "\n" for n in dropped)
        keep = {n for n, r in parsed.records if _iteration(r) <= last_iteration}
        write_text_atomic(self.path, "".join(lines[n - 1] + "\n" for n in sorted(keep)))
        notes.append(f"the lines set aside are in {self.dropped_path}")
        return notes


def _iteration(record: dict[str, Any]) -> float:
    value = record.get("iteration")
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else float("inf")


def _append_whole(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` in full, or cut the file back to where it was and raise."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
        except OSError as err:
            os.ftruncate(fd, size)
            if out_of_space(err):
                raise DiskFull(path, err) from err
            raise
    finally:
        os.close(fd)

