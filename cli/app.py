"""The `twostream` command: one typer app, one sub-module of commands per area."""

from __future__ import annotations

import logging

import typer

from cli import dataset_cmds, extract_cmds, feature_cmds, fusion_cmds, run_cmds, stream_cmds

app = typer.Typer(
    name="twostream",
    help="Two-stream (RGB + optical flow) violence detection: index, extract, train, fuse, evaluate, predict.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _module in (dataset_cmds, extract_cmds, feature_cmds, stream_cmds, fusion_cmds, run_cmds):
    _module.register(app)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log library progress to stderr.")) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )


def main() -> None:
    app()
