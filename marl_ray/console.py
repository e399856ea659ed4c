"""What a run shows on the console, and what goes to its log file only.

* `setup(level, quiet)` (the command line's --log-level / --quiet): one handler on the root logger that
  writes through `tqdm.write`, so a log line never breaks a progress bar. --quiet: warnings and errors
  only, no progress bars, no per-step metric lines.
* `progress(wanted)`: whether a stage shows a bar (`run.progress`: true, false or auto = only on a
  terminal). Where it shows none, `marl-ray rl` prints one line per policy per step instead (the bar's
  `\r` redraws are useless in a log file such as `ray job logs`).
* `log_file(folder)`: while a stage runs, every record at INFO and above also goes to FOLDER/log.txt,
  with the records marked `FILE_ONLY` (TRL trainers' dicts of numbers) that the console never shows.
* `route_trainer_logs(trainer, progress)`: a transformers Trainer keeps its one progress bar (when
  `progress`) and sends its log dicts to the log file instead of printing them under the bar.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

#: `extra=` of records that belong in the log file, not on the console.
FILE_ONLY = {"file_only": True}
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

_state = {"quiet": False}


class _NotFileOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


class TqdmHandler(logging.StreamHandler):
    """A stderr handler that writes through tqdm, above any progress bar."""

    def __init__(self):
        super().__init__(sys.stderr)
        self.addFilter(_NotFileOnly())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def setup(level: str = "INFO", quiet: bool = False) -> None:
    """The console of a `marl-ray` command: `level` (one of LEVELS) or, with `quiet`, WARNING."""
    level = level.upper()
    if level not in LEVELS:
        raise ValueError(f"--log-level must be one of {', '.join(LEVELS)}, got {level!r}")
    _state["quiet"] = quiet
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, TqdmHandler):
            root.removeHandler(h)
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter(FORMAT, "%H:%M:%S"))
    handler.setLevel(logging.WARNING if quiet else getattr(logging, level))
    root.addHandler(handler)
    root.setLevel(min(logging.INFO, handler.level))  # the log file keeps INFO whatever the console shows
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def quiet() -> bool:
    """Whether --quiet was given: no progress bars, no per-step lines."""
    return _state["quiet"]


def progress(wanted) -> bool:
    """Whether to show a progress bar a config asks for (`wanted`: true, false or "auto"): never under
    --quiet; with "auto", only when stderr (where bars go) is a terminal. Without a bar a run prints one
    line per policy per step instead, which is what a log file (`ray job logs`) can show."""
    if _state["quiet"]:
        return False
    if wanted == "auto":
        return _isatty(sys.stderr)
    return bool(wanted)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


class _LazyFileHandler(logging.FileHandler):
    """Creates its folder and file at the first record: a run refused before it logs anything leaves
    no trace."""

    def __init__(self, path: Path):
        super().__init__(path, delay=True)

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


@contextlib.contextmanager
def log_file(folder: str | Path, name: str = "log.txt"):
    """Every record at INFO and above, FILE_ONLY ones included, also goes to folder/name while this runs."""
    path = Path(folder) / name
    handler = _LazyFileHandler(path)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(min(old_level or logging.WARNING, logging.INFO))
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


def route_trainer_logs(trainer, progress_bar: bool) -> None:
    """Keep a transformers Trainer's progress bar (when `progress_bar`) and send its log dicts
    ({'loss': ..., 'grad_norm': ...}, the final train_runtime line) to the log file, not the console."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

    trainer_log = logging.getLogger("marl_ray.trainer")

    class _Logs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                trainer_log.info("step %d: %s", state.global_step, logs, extra=FILE_ONLY)

    class _Bar(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass  # the bar stays; the dict goes to the log file (_Logs)

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress_bar:
        trainer.add_callback(_Bar())
    trainer.add_callback(_Logs())


def say(message: str) -> None:
    """A line for the person at the console (what runs next, where it writes), above any progress bar;
    nothing under --quiet. Also in the log file."""
    log.info("%s", message, extra=FILE_ONLY)
    if not _state["quiet"]:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()
