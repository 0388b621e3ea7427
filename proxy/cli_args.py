"""How `byok-proxy` parses its command line: every option's help shows its default,
every command has a description, options shared by several commands are defined once.

Commands build their parsers with `Parser` (a subcommand parser is one too) and
take the shared options from `common()`.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

from proxy.cpus import usable_cpus

Parents = list[argparse.ArgumentParser]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written; every option's help ends with its default, or says
    it is required."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS:
            return text
        if "(default" in text or "(required)" in text:
            return text
        if action.required:
            return f"{text} (required)"
        if action.default is False:
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """Every (sub)command's parser formats its help with `HelpFormatter`; an option shared by
    several commands (`--config`) gets its one help text when given none."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        if kwargs.get("help") is None and args and args[0] in SHARED_HELP:
            kwargs["help"] = SHARED_HELP[args[0]]
        return super().add_argument(*args, **kwargs)


class Version(argparse.Action):
    """`--version`: looked up only when asked (importlib.metadata is not free)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from importlib.metadata import version

        print(f"byok-proxy {version('byok-proxy')}")
        parser.exit()


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def worker_count(text: str) -> int:
    """An argparse type for `--workers`: a whole number of at least 1, or `auto`: one per
    CPU this process may use (`usable_cpus`)."""
    if text.strip().lower() == "auto":
        return usable_cpus()
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (or auto)") from None


def about(text: str) -> str:
    """A command's description paragraph(s), as written in the source."""
    return textwrap.dedent(text).strip()


SHARED_HELP = {
    "--config": "config.yaml path (default: $BYOK_CONFIG, else ./config.yaml if present)",
    "--dev": "read the secrets from ./.byok/, as `serve --dev` does (made there on first use); "
    "not for production",
}


def common() -> tuple[Parser, Parser]:
    """The shared options, as parent parsers: `--config`/`--dev` for the commands on the
    database, `--json` for those that list or show."""
    database = Parser(add_help=False)
    database.add_argument("--config", default=None)
    database.add_argument("--dev", action="store_true")
    as_json = Parser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    return database, as_json
