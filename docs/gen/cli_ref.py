"""The CLI reference, rendered from the argparse parser that `spectra` itself runs.

`python docs/gen/cli_ref.py` prints the Markdown; the MkDocs hook puts it into
docs/cli.md at build time, so the page cannot drift from the parser.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator


def commands(parser: argparse.ArgumentParser, prefix: str = "spectra") -> Iterator[tuple]:
    """(command path, its parser, its one-line help) for every subcommand, depth first."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {a.dest: a.help for a in action._choices_actions}
        for name, sub in action.choices.items():
            path = f"{prefix} {name}"
            yield path, sub, helps.get(name) or ""
            yield from commands(sub, path)


def arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The documented arguments of one command: all but -h and nested subcommand slots."""
    return [
        a
        for a in parser._actions
        if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)
    ]


def option_names(parser: argparse.ArgumentParser) -> list[str]:
    """Every flag (`--x`, `-o`) and positional name (as the usage line shows it)."""
    names = []
    for a in arguments(parser):
        names += a.option_strings or [a.metavar or a.dest.upper()]
    return names


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _exclusive(parser: argparse.ArgumentParser) -> dict[argparse.Action, str]:
    """Action -> a note naming the other members of its mutually exclusive group."""
    notes = {}
    for group in parser._mutually_exclusive_groups:
        names = ", ".join(f"`{a.option_strings[-1]}`" for a in group._group_actions)
        for a in group._group_actions:
            notes[a] = f"{'exactly' if group.required else 'at most'} one of {names}"
    return notes


def _argument_row(a: argparse.Action, exclusive: str = "") -> str:
    if a.option_strings:
        name = ", ".join(f"`{s}`" for s in a.option_strings)
        if a.nargs != 0:  # takes a value
            metavar = a.metavar or a.dest.upper()
            name += f" `{metavar}`" if a.nargs != "?" else f" `[{metavar}]`"
    else:
        name = f"`{a.metavar or a.dest.upper()}`"
    notes = [exclusive] if exclusive else []
    if a.choices:
        notes.append("one of " + ", ".join(f"`{c}`" for c in a.choices))
    if a.required and a.option_strings:
        notes.append("required")
    if a.default is not None and a.default is not argparse.SUPPRESS and a.nargs != 0:
        notes.append(f"default `{a.default}`")
    if a.nargs == "?" and a.const is not None and a.option_strings:
        notes.append(f"alone: `{a.const}`")
    if a.nargs == "append" or isinstance(a, argparse._AppendAction):
        notes.append("repeatable")
    return f"| {name} | {_cell(a.help or '')} | {_cell('; '.join(notes))} |"


def _usage(parser: argparse.ArgumentParser) -> str:
    """The usage line at a fixed width (the terminal's would make the page vary)."""
    fmt = argparse.HelpFormatter(parser.prog, width=88)
    fmt.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, prefix="")
    return fmt.format_help().strip()


def render(parser: argparse.ArgumentParser | None = None) -> str:
    """The Markdown reference of every `spectra` subcommand."""
    if parser is None:
        from spectra.cli import build_parser

        parser = build_parser()
    out = []
    for path, sub, help_ in commands(parser):
        depth = path.count(" ")  # spectra analyze: 1; spectra plan auto: 2
        out.append(f"{'#' * (depth + 1)} `{path}`\n")
        if help_:
            out.append(help_[0].upper() + help_[1:] + ".\n")
        usage = _usage(sub)
        out.append(f"```\n{usage}\n```\n")
        args = arguments(sub)
        if args:
            out.append("| argument | what it does | notes |\n| --- | --- | --- |")
            exclusive = _exclusive(sub)
            out.extend(_argument_row(a, exclusive.get(a, "")) for a in args)
            out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(render())
