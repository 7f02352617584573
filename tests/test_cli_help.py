"""``--help`` shows every help text whole: Typer renders them as rich markup, where a bracketed word
such as ``[default: 100]`` or ``[eval]`` is a style tag and vanishes unless written ``\\[...]``."""

from __future__ import annotations

import typer
from rich.text import Text

from mlx_dupq.cli import app


def _commands(cmd, path=("mlx-dupq",)):
    yield " ".join(path), cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _commands(sub, path + (name,))


def test_help_texts_lose_nothing_to_rich_markup():
    commands = list(_commands(typer.main.get_command(app)))
    assert len(commands) == 21  # the app, 11 commands, 3 groups and their 6 commands
    lost = [f"{path} {getattr(p, 'name', '')}: {text!r}" for path, cmd in commands
            for p, text in [(cmd, cmd.help or "")] + [(q, getattr(q, "help", None) or "") for q in cmd.params]
            if Text.from_markup(text).plain != text.replace("\\[", "[")]
    assert lost == []
