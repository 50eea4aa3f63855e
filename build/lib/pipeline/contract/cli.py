"""Command-line errors: a user's mistake is one ``error: …`` line and exit code 2; a bug keeps its traceback.

Every command's ``main`` is wrapped by :func:`entry` and builds its parser with
:class:`ArgumentParser`. What counts as a user's mistake is deliberate, never "any
ValueError": argparse's own errors (:class:`UsageError`), and :class:`UserError`, raised
where a command validates what the user gave (a path, a name, a config file, the version of
the shards it reads). Subclasses keep the builtin type that callers and tests already catch
(``InputNotFound`` is a ``FileNotFoundError``, ``BadInput`` a ``ValueError``, ``UnknownName`` a
``KeyError``). A command that reads data files may name more exception types that mean "this
input is bad" (``entry(user_errors=(schema.SchemaError,))`` for the shard readers).

``--debug`` (every command) or ``MDV2_DEBUG=1`` shows the traceback of a user error too.
``--help`` of every command shows each option's default (:class:`HelpFormatter`), and a command whose
reader goes away (``mdv2-describe --json | head``) ends quietly with exit code 141, as a process killed
by SIGPIPE does. Standard library only: every command imports this before anything heavy.
"""
from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
from typing import Callable

EXIT_USER = 2            # like argparse: the command line or its inputs are wrong
EXIT_PIPE = 141          # 128 + SIGPIPE: what a shell reports for a writer whose reader closed the pipe
DEBUG_FLAG = "--debug"
DEBUG_ENV = "MDV2_DEBUG"


class UserError(Exception):
    """An input mistake. The message says what is wrong and what to do; the command prints it on one line."""


class UsageError(UserError):
    """argparse rejected the command line (unknown flag, missing argument, invalid choice)."""


class InputNotFound(UserError, FileNotFoundError):
    """A path the user named (or one derived from it) does not exist."""


class BadInput(UserError, ValueError):
    """A value, file or folder the user gave is not what the command needs."""


class OutOfRange(UserError, IndexError):
    """An index the user gave is past the end."""


class UnknownName(UserError, KeyError):
    """A name the user gave (a preset, a sample key, a bucket) is not among the known ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written, and ``(default: X)`` after every option whose help does not
    already say its default (flags and options without a default value show none)."""

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        d = action.default
        return not (d is None or d is argparse.SUPPRESS or isinstance(d, bool) or action.nargs == 0
                    or (isinstance(d, (list, tuple, set, str)) and not d)
                    or not (action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)))

    def _format_action(self, action: argparse.Action) -> str:
        if not (action.help or "").strip() and self._shows_default(action):  # argparse skips an empty help
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or not self._shows_default(action):
            return text
        return f"{text} (default: %(default)s)"


def with_defaults(formatter: type[argparse.HelpFormatter]) -> type[argparse.HelpFormatter]:
    """``formatter`` that also shows defaults (RawDescriptionHelpFormatter -> :class:`HelpFormatter`)."""
    if issubclass(formatter, HelpFormatter):
        return formatter
    if formatter in (argparse.HelpFormatter, argparse.RawDescriptionHelpFormatter):
        return HelpFormatter
    return type(f"Defaults{formatter.__name__}", (HelpFormatter, formatter), {})


class ArgumentParser(argparse.ArgumentParser):
    """argparse with ``--debug``, defaults in ``--help`` (:class:`HelpFormatter`, also for a ``formatter_class``
    passed in) and errors raised as UsageError (one line via :func:`entry`, not usage + exit)."""

    def __init__(self, *args, **kwargs):
        kwargs["formatter_class"] = with_defaults(kwargs.get("formatter_class", HelpFormatter))
        super().__init__(*args, **kwargs)
        # SUPPRESS: the flag is read from argv by `entry`; a sub-parser must not reset it in the namespace
        self.add_argument(DEBUG_FLAG, action="store_true", default=argparse.SUPPRESS,
                          help=f"show the Python traceback of an error (or set {DEBUG_ENV}=1)")

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def debug_requested(argv: list[str] | None = None) -> bool:
    args = sys.argv[1:] if argv is None else argv
    head = args[:args.index("--")] if "--" in args else args
    return DEBUG_FLAG in head or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(e: BaseException) -> str:
    """The message of e on one line."""
    text = str(e).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: the original message is the last line
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(e).__name__


def yaml_problem(e: Exception) -> str:
    """A yaml.YAMLError as 'problem at line L, column C' (its own text spans several lines with a caret)."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or e}{where}"


def entry(main: Callable | None = None, *, user_errors: tuple[type[BaseException], ...] = ()):
    """Decorate a command's ``main(argv) -> int``: user errors -> one ``error:`` line on stderr, exit code 2.

    ``user_errors`` adds exception types that mean bad input for this command only. Anything else
    propagates with its traceback. With ``--debug`` or MDV2_DEBUG=1 user errors propagate too.
    """
    caught = (UserError, *user_errors)

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(argv: list[str] | None = None) -> int:
            try:
                code = fn(argv)
                sys.stdout.flush()  # a closed pipe shows here, not as "Exception ignored" at exit
                return code
            except BrokenPipeError:
                return reader_gone()
            except caught as e:
                if debug_requested(argv):
                    raise
                print(f"error: {one_line(e)}", file=sys.stderr)
                return EXIT_USER
        return run

    return wrap(main) if main is not None else wrap


def reader_gone() -> int:
    """stdout's reader closed the pipe (``| head``): point stdout at /dev/null so the interpreter's final flush
    cannot raise again, and exit like a process killed by SIGPIPE (the Python docs' recipe, signal.html)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (captured in a test): nothing to flush there
        pass
    return EXIT_PIPE
