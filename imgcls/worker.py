"""One run of a group on its own GPU: `python -m imgcls.worker DIR/spec.json` (jobs.run_jobs starts it with
CUDA_VISIBLE_DEVICES set to that GPU). It calls run.run with the spec the parent wrote and exits 0, or 1
when the run failed (its outcome.json says why). It imports only imgcls, never the user's script, so a
script or notebook without an `if __name__ == "__main__":` guard cannot be started again by it."""
from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from imgcls import run
    from imgcls.errors import UserError
    from imgcls.training import epoch_line

    argv = sys.argv[1:] if argv is None else argv
    spec = run.RunSpec.from_json(Path(argv[0]).read_text())

    def log(text: str) -> None:
        print(text, flush=True)

    try:
        result = run.run(spec, log=log, on_epoch=lambda m: log(epoch_line(m)))
    except UserError as e:
        print(f"imgcls: error: {e}", file=sys.stderr)
        return 1
    return 0 if result.stopped == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
