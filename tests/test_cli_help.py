"""The command line explains itself: help text on every option, and a config reference read from config.py."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from mimkit.cli import build_parser, main
from mimkit.config import Config


def _parsers(parser: argparse.ArgumentParser, name: str = "mimkit"):
    """(command name, parser) for the parser and every sub-command below it."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_option_of_every_command_has_help():
    commands = dict(_parsers(build_parser()))
    assert {"mimkit pretrain", "mimkit knn", "mimkit linprobe", "mimkit finetune", "mimkit visualize",
            "mimkit demo", "mimkit models", "mimkit config show"} <= set(commands)
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in commands.items() for a in p._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert not missing, f"options without help: {missing}"


def test_pretrain_help_says_how_to_list_config_keys(capsys):
    assert main(["pretrain", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "mimkit config show --all" in text and "mimkit config show train.epochs" in text


def test_config_show_one_key_a_section_and_the_model(capsys):
    assert main(["config", "show", "train.epochs"]) == 0
    assert capsys.readouterr().out == "train.epochs (int, default 400): passes over the training split\n"
    assert main(["config", "show", "data"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == [f"data.{f.name}" for f in dataclasses.fields(Config().data)]
    assert 'data.path (str or list[str], default "digits"): ' in lines[0]
    assert main(["config", "show", "model", "--model", "dama_vit_tiny_patch4"]) == 0
    model = capsys.readouterr().out
    assert "model.mask_overlap_ratio (float, default 0.5): rho, fraction of student 1's visible patches" in model
    assert "model.decoder_embed_dim (int, default 128)" in model  # the preset's value, not the class default 512


def test_config_show_all_lists_every_key(capsys):
    assert main(["config", "show", "--all"]) == 0
    keys = [line.split(" ", 1)[0] for line in capsys.readouterr().out.splitlines()]
    sections = [f.name for f in dataclasses.fields(Config) if f.name not in ("output_dir", "model")]
    expected = [f"{s}.{f.name}" for s in sections for f in dataclasses.fields(getattr(Config(), s))]
    assert [k for k in keys if not k.startswith(("model.", "output_dir"))] == expected
    assert keys[:2] == ["output_dir", "model.name"] and "model.mask_ratio" in keys
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("argv,fragment", [
    (["config", "show", "model", "--model", "mae_vit_tiny_patch5"], "Did you mean mae_vit_tiny_patch4"),
    (["config"], "the following arguments are required: show"),
    (["knn", "--checkpoint", "x.pt"], "the following arguments are required: --data"),
])
def test_usage_errors_are_one_line(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and fragment in err
