"""What counts as a user's mistake (bad input) rather than a bug in ovlt.

A user-input error is raised with a message that names the file / record / key and the reason;
the commands print it as one line, without a traceback (`ovlt.distributed.report_error`).
Anything else is a bug and keeps its traceback.

`InputError` is the base for ovlt's own input errors; `input_error_types()` adds the other
classes the packages raise for bad input (config keys, data records, images, benchmark files,
missing tensors), a process group that cannot start (launcher environment, port, world size:
the rank-tagged message says which) and the OS errors about a named path.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad user input: the message names the file, record or key and says what is wrong."""


def input_error_types() -> tuple[type[BaseException], ...]:
    from ovlt.config import ConfigError
    from ovlt.data.formats import DataError
    from ovlt.data.image_loader import ImageError
    from ovlt.distributed import DistributedError
    from ovlt.eval.readers import BenchmarkError
    from ovlt.models.qwen2_5_vl.state_dict_adapter import MissingTensorError
    return (InputError, ConfigError, DataError, ImageError, BenchmarkError, MissingTensorError,
            DistributedError, FileNotFoundError, FileExistsError, NotADirectoryError,
            IsADirectoryError, PermissionError)


def is_input_error(exc: BaseException) -> bool:
    return isinstance(exc, input_error_types())


def error_line(exc: BaseException) -> str:
    """The one line a command prints for a user-input error."""
    if isinstance(exc, KeyError) and exc.args:  # KeyError's str() is the repr of its argument
        msg = str(exc.args[0])
    elif isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        msg = f"{exc.filename}: {exc.strerror}"
    else:
        msg = str(exc) or type(exc).__name__
    if msg.startswith("Caught ") and "Original Traceback" in msg:
        # re-raised from a DataLoader worker: the message embeds the worker's traceback,
        # whose last line is "<Type>: <message>"
        last = [ln for ln in msg.splitlines() if ln.strip()][-1]
        msg = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(msg.split("\n"))
