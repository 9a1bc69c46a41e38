"""The ``medvae`` command line.

Sub-command modules are imported lazily: only the chosen command pays for torch/monai/mlflow.
User errors (:class:`medvae.errors.MedvaeError`) become one line on stderr and exit status 2.
Ctrl-C ends a command with one line and status 130; SIGTERM (Slurm pre-emption, ``kill``) and SIGHUP
are handled as Ctrl-C is (staging removed, outputs of the command rolled back, claims released), with
status 128 + the signal's number (143 for SIGTERM).
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import signal
import sys
from typing import Sequence

from medvae import __version__
from medvae.commands import COMMANDS


def _command_module(name: str):
    return importlib.import_module(f"medvae.commands.{COMMANDS[name]}")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors, as every other bad input gets (exit status 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="medvae",
        description="Restore CT and MR scans (denoise, inpaint) with a masked VAE, "
        "and check restorations against reference scans.",
    )
    parser.add_argument("--version", action="version", version=f"medvae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = _command_module(name)
        except ModuleNotFoundError:  # a command not written yet
            continue
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


#: a value that starts like a negative number (``-600,1500``, ``-1e3``, ``-.5``); no option does
_NEGATIVE_VALUE = re.compile(r"-\.?\d")


def _value_options(parser: argparse.ArgumentParser) -> set[str]:
    """The long options, of every (sub-)command, that take one value and are a flag in none."""
    takes, flags = set(), set()

    def walk(p: argparse.ArgumentParser) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)
            elif action.option_strings:
                one = action.nargs in (None, "?", 1)
                (takes if one else flags).update(o for o in action.option_strings if o.startswith("--"))

    walk(parser)
    return takes - flags


def join_negative_values(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``--window -600,1500`` as ``--window=-600,1500``.

    argparse reads a value that starts with '-' as an option unless it is a plain negative number,
    so ``--window -600,1500`` (or ``-1e3``) would fail with "expected one argument"; the ``=`` form is
    the same option and value. Only a value that starts like a negative number, after an option that
    takes one value, is joined (``--window lung`` and flags are left alone), and nothing after ``--``.

    >>> p = argparse.ArgumentParser(); _ = p.add_argument("--window"); _ = p.add_argument("--x", action="store_true")
    >>> join_negative_values(p, ["--window", "-600,1500", "--x", "-1", "--window", "lung"])
    ['--window=-600,1500', '--x', '-1', '--window', 'lung']
    """
    options, out, i = _value_options(parser), [], 0
    argv = list(argv)
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            return out + argv[i:]
        if tok in options and i + 1 < len(argv) and _NEGATIVE_VALUE.match(argv[i + 1]):
            out.append(f"{tok}={argv[i + 1]}")
            i += 2
            continue
        out.append(tok)
        i += 1
    return out


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``parser.parse_args`` with negative values after an option (:func:`join_negative_values`) and
    ``KEY=VALUE`` overrides (``medvae train``) on both sides of an option: argparse takes a positional
    list once, so ``a=1 --no-mlflow b=2`` would leave ``b=2`` unrecognized."""
    argv = join_negative_values(parser, argv)
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) and all(
            "=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.parse_args(argv)  # argparse's own "unrecognized arguments" error and exit
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from medvae.runtime import hold_signals_to_exit

    status = 130
    try:
        status = _main(argv)
    except KeyboardInterrupt:  # a second signal that came while the first one's handler was put back
        print("medvae: interrupted", file=sys.stderr)
    finally:
        if argv is None:  # the program itself (not a caller's main([...])): its status is decided
            try:
                hold_signals_to_exit()
            except KeyboardInterrupt:
                pass
    return status


def _main(argv: Sequence[str] | None) -> int:
    from medvae.runtime import LateSignal, Terminated, termination_as_interrupt

    command = "medvae"
    try:
        with termination_as_interrupt():
            parser = build_parser()
            args = parse(parser, sys.argv[1:] if argv is None else argv)
            if not getattr(args, "_module", None):
                parser.print_help()
                return 2
            command = f"medvae {args.command}"
            return _run(args)
    except KeyboardInterrupt as exc:  # also when it came while the parser was built
        if isinstance(exc, LateSignal):  # the work was done: a rerun must not be refused its own outputs
            name = signal.Signals(exc.signum).name
            print(f"{command}: {name} came after the outputs were complete; they are kept", file=sys.stderr)
            return 0
        if isinstance(exc, Terminated):
            name = signal.Signals(exc.signum).name
            print(f"{command}: terminated ({name})", file=sys.stderr)
            return 128 + exc.signum
        print(f"{command}: interrupted", file=sys.stderr)
        return 130


def _run(args) -> int:
    from medvae.errors import MedvaeError, os_reason

    try:
        return int(args._module.run(args) or 0)
    except MedvaeError as exc:
        print(f"medvae {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a file-size limit, a read-only or vanished folder
        from medvae.io.atomic import is_staging_path

        if isinstance(exc, BrokenPipeError) and exc.filename is None and _stdout_closed():
            return 141  # `medvae info X | head -1`: silent, as a Unix tool whose reader closed the pipe

        named = None if is_staging_path(exc.filename) else exc.filename  # the user knows the output, not it
        where = named or _output_of(args)  # a failed write names no file
        what = "" if named else "cannot write the output, "
        print(f"medvae {args.command}: error: {str(where) + ': ' if where else ''}{what}{os_reason(exc)}"
              f"{'; nothing was written' if what else ''}", file=sys.stderr)
        return 2


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone; if so, stdout is pointed at /dev/null, so that the
    interpreter's flush at exit does not fail (and print) again."""
    import select

    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        gone = any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows) or no real stdout: not told
        return False
    if gone:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    return gone


def _output_of(args) -> str | None:
    """The output a command was writing: its argument's name differs from command to command."""
    for name in ("output", "report", "out", "store", "output_dir", "dir"):
        value = getattr(args, name, None)
        if value:
            return str(value)
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
