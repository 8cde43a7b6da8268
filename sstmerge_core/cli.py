"""The `sstmerge` command line.

Core commands live in `sstmerge_core.commands`; the service adds `serve`, `worker` and `keys` through the
`sstmerge.commands` entry-point group, so this library never imports web or queue code.
Exit codes: 0 ok, 2 bad usage or input (one line on stderr), 1 internal failure.

`--log-level` is accepted before or after the sub-command (`sstmerge --log-level INFO merge …` or
`sstmerge merge … --log-level INFO`); the commands that run models also take `--threads N` (torch intra-op
threads).
"""

from __future__ import annotations

import importlib
import logging
import sys
from importlib.metadata import entry_points

import click

from .errors import InputError

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
MODEL_COMMANDS = {"merge", "evaluate", "train-lora", "demo"}
"""Commands that run a model, which take `--threads`."""

CORE_COMMANDS = {
    "merge": "sstmerge_core.commands.merge:merge",
    "evaluate": "sstmerge_core.commands.evaluate:evaluate",
    "search": "sstmerge_core.commands.search:search",
    "train-lora": "sstmerge_core.commands.train_lora:train_lora",
    "demo": "sstmerge_core.commands.demo:demo",
}


def _set_log_level(_ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        from .logs import configure

        configure(value)


def _set_threads(_ctx: click.Context, _param: click.Parameter, value: int | None) -> None:
    if value is not None:
        import torch

        torch.set_num_threads(value)


def _with_common_options(name: str, command: click.Command) -> click.Command:
    """Add `--log-level` (every command) and `--threads` (commands that run models) once to `command`."""
    present = {p.name for p in command.params}
    if "log_level" not in present:
        command.params.append(
            click.Option(
                ["--log-level"],
                type=click.Choice(LOG_LEVELS, case_sensitive=False),
                default=None,
                expose_value=False,
                is_eager=True,
                callback=_set_log_level,
                help="Python logging level (also accepted before the command).  [default: WARNING]",
            )
        )
    if name in MODEL_COMMANDS and "threads" not in present:
        command.params.append(
            click.Option(
                ["--threads"],
                type=click.IntRange(1),
                default=None,
                expose_value=False,
                callback=_set_threads,
                help="Torch intra-op threads.  [default: torch's choice, usually the number of cores]",
            )
        )
    return command


class LazyGroup(click.Group):
    """A group whose core commands are imported only when used (keeps `--help` fast, torch-free)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*CORE_COMMANDS, *super().list_commands(ctx)})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in CORE_COMMANDS:
            module, _, attr = CORE_COMMANDS[name].partition(":")
            command = getattr(importlib.import_module(module), attr)
        else:
            command = super().get_command(ctx, name)
        return None if command is None else _with_common_options(name, command)


@click.group(cls=LazyGroup)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default="WARNING",
    show_default=True,
    help="Python logging level (also accepted after the command).",
)
def cli(log_level: str) -> None:
    """sstmerge: merge LoRA adapters with SST-Merge (or a baseline) and evaluate safety and utility."""
    from .logs import configure

    configure(log_level)


def _load_plugins() -> None:
    for entry in entry_points(group="sstmerge.commands"):
        try:
            entry.load()(cli)
        except ImportError as exc:  # the service extras are optional for core use
            logging.getLogger(__name__).debug("plugin %s not loaded: %s", entry.name, exc)


def main(argv: list[str] | None = None) -> int:
    _load_plugins()
    try:
        cli.main(args=argv, prog_name="sstmerge", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except click.ClickException as exc:
        exc.show()
        return 2 if isinstance(exc, click.UsageError) or exc.exit_code == 2 else exc.exit_code
    except InputError as exc:
        click.echo(f"error: {exc}", err=True)
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
