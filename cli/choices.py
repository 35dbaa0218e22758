"""Option choices shared by several commands, built from the tuples that define them, so a new
backbone or head is offered everywhere as soon as the model code knows it."""

from __future__ import annotations

from enum import Enum

from streams.config import BACKBONES, HEADS


def choice_enum(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A str Enum with one member per value (named as the value), the form typer lists as choices."""
    return Enum(name, {v: v for v in values}, type=str)


PRETRAINED_HELP = "Start the backbones from ImageNet weights in the torch hub cache (never downloaded)."
WEIGHTS_HELP = "Backbone weights file (loaded even without --pretrained)."

Backbone = choice_enum("Backbone", BACKBONES)
Head = choice_enum("Head", HEADS)
