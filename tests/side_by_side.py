"""Independent exports run two at a time.

Most of an export is tracing (torch.export and its ONNX translation): single-threaded Python. A fixture that
needs several exports that do not depend on each other runs half of them in a child process while this one
runs the rest, so CI's second core does the work it otherwise idles through. Each export is the same
`export_checkpoint` call, validated against the reference, as it would be in process.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MARK = "side_by_side: "
SCRIPT = f"""
import json, sys, traceback
from nextn.export.exporter import ExportOptions, export_checkpoint
for name, checkpoint, out, opts in json.loads(sys.argv[1]):
    try:
        export_checkpoint(checkpoint, out, ExportOptions(**opts))
        error = None
    except Exception:
        error = traceback.format_exc()
    print({MARK!r} + json.dumps([name, error]), flush=True)
"""


class ExportFailed(Exception):
    """One export of export_side_by_side failed (a child's: its traceback in the message)."""


class Exports(dict):
    """name -> manifest. Looking up a failed export raises its failure (so look up, not .values()): a fixture
    whose tests each read their own export fails only the tests of the export that failed."""

    def __getitem__(self, name: str) -> dict:
        value = super().__getitem__(name)
        if isinstance(value, BaseException):
            raise value
        return value

    def all(self) -> dict:
        """Every manifest; the first failure raised."""
        return {name: self[name] for name in self}


def export_side_by_side(jobs: dict[str, tuple], here: int | None = None) -> Exports:
    """export_checkpoint(checkpoint, out, opts) for each job {name: (checkpoint, out, opts)}: the first `here`
    (default: half, rounded up) in this process while a child process exports the rest. A failed export does
    not stop the others."""
    from nextn.export.exporter import export_checkpoint

    names = list(jobs)
    split = (len(names) + 1) // 2 if here is None else here
    here, there = names[:split], names[split:]
    done = Exports()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = None
        if there:
            arg = json.dumps([(n, str(jobs[n][0]), str(jobs[n][1]), dataclasses.asdict(jobs[n][2])) for n in there])
            child = subprocess.Popen([sys.executable, "-c", SCRIPT, arg], stdout=out, stderr=err)
        try:
            for name in here:
                try:
                    done[name] = export_checkpoint(*jobs[name])
                except Exception as e:
                    done[name] = e
        except BaseException:  # interrupted: the child goes too
            if child is not None:
                child.kill()
                child.wait()
            raise
        if child is not None:
            code = child.wait()
            out.seek(0)
            errors = dict(json.loads(line[len(MARK) :]) for line in out.read().splitlines() if line.startswith(MARK))
            for name in there:
                if name in errors and errors[name] is None:
                    done[name] = json.loads((Path(jobs[name][1]) / "manifest.json").read_text())
                else:
                    err.seek(0)
                    why = errors.get(name) or f"the child process exited with {code}:\n{err.read()[-4000:]}"
                    done[name] = ExportFailed(f"export {name} to {jobs[name][1]} failed:\n{why}")
    return Exports((name, dict.get(done, name)) for name in names)  # in job order
