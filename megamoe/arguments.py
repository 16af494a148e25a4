"""Megatron-style command-line flags, generated from the dataclasses of :mod:`megamoe.config`.

Each field declares its flag once (help and argparse details in its metadata); this module turns every
section of :class:`Config` into an argument group and builds the Config back by field name. Flag names
follow Megatron-LM so existing launch scripts carry over. A ``--model-preset`` fills the model shape;
any explicit shape flag overrides the preset.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Iterator, Sequence

from megamoe.config import Config, ConfigError

# docs/ARCHITECTURE.md, "The OpenMoE model": each FFN has 4*H*I parameters; vocab padded to 256384.
PRESETS: dict[str, dict[str, float | int]] = {
    # A few hundred K parameters, for CPU tests and the quickstart.
    # Megatron's N(0, 0.02) init: at this size and a few hundred CPU steps it learns faster than T5X's
    "openmoe-tiny": dict(num_layers=4, hidden_size=64, num_attention_heads=4, kv_channels=16,
                         ffn_hidden_size=64, num_experts=8, moe_router_topk=2, moe_layer_freq=2,
                         seq_length=128, vocab_size=1024, moe_z_loss_coeff=1e-4, output_z_loss_coeff=1e-4),
    "openmoe-base": dict(num_layers=12, hidden_size=768, num_attention_heads=12, kv_channels=64,
                         ffn_hidden_size=2048, num_experts=16, moe_router_topk=2, moe_layer_freq=4,
                         seq_length=2048, vocab_size=256384, moe_z_loss_coeff=1e-4, init_method="t5x",
                         output_z_loss_coeff=1e-4),
    "openmoe-8b": dict(num_layers=24, hidden_size=2048, num_attention_heads=24, kv_channels=128,
                       ffn_hidden_size=8192, num_experts=32, moe_router_topk=2, moe_layer_freq=6,
                       seq_length=2048, vocab_size=256384, moe_z_loss_coeff=1e-4, init_method="t5x",
                         output_z_loss_coeff=1e-4),
    "openmoe-34b": dict(num_layers=32, hidden_size=3072, num_attention_heads=24, kv_channels=128,
                        ffn_hidden_size=12288, num_experts=32, moe_router_topk=2, moe_layer_freq=4,
                        seq_length=2048, vocab_size=256384, moe_z_loss_coeff=1e-3, init_method="t5x",
                         output_z_loss_coeff=1e-4),
    # Mixtral (docs/ARCHITECTURE.md, "The Mixtral family"): SwiGLU experts have 3*H*I parameters, GQA
    # keys/values 2*H*G*d; no router z-loss and no output z-loss, aux loss 0.02 (HF's
    # router_aux_loss_coef). The tiny one has 2 query groups, so TP 2 divides them.
    "mixtral-tiny": dict(num_layers=4, hidden_size=64, num_attention_heads=4, kv_channels=16,
                         ffn_hidden_size=64, num_experts=8, moe_router_topk=2, moe_layer_freq=1,
                         seq_length=128, vocab_size=1024, model_family="mixtral", group_query_attention=True,
                         num_query_groups=2, rotary_base=1e6, norm_epsilon=1e-5, moe_aux_loss_coeff=0.02,
                         moe_z_loss_coeff=0.0, output_z_loss_coeff=0.0),
    "mixtral-8x7b": dict(num_layers=32, hidden_size=4096, num_attention_heads=32, kv_channels=128,
                         ffn_hidden_size=14336, num_experts=8, moe_router_topk=2, moe_layer_freq=1,
                         seq_length=4096, vocab_size=32000, model_family="mixtral",
                         group_query_attention=True, num_query_groups=8, rotary_base=1e6, norm_epsilon=1e-5,
                         moe_aux_loss_coeff=0.02, moe_z_loss_coeff=0.0, output_z_loss_coeff=0.0),
}


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one line) instead of printing usage and exiting 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def _sections() -> Iterator[tuple[str, type, list[tuple[str, dataclasses.Field]]]]:
    """(name, dataclass, [("name.field", field)]) of every Config section, in --help order."""
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        cls = hints[section.name]
        yield section.name, cls, [(f"{section.name}.{f.name}", f) for f in dataclasses.fields(cls)]


def _flag_name(f: dataclasses.Field) -> str:
    default = "--no-" + f.name if f.default is True else "--" + f.name
    return f.metadata.get("flag", default.replace("_", "-"))


def _add_flag(group: argparse._ActionsContainer, dest: str, f: dataclasses.Field, typ: object) -> None:
    name = _flag_name(f)
    kwargs = {k: v for k, v in f.metadata.items() if k not in ("flag", "negation")}
    if typ is bool:
        kwargs["action"] = "store_false" if f.default else "store_true"
    else:  # int, float, str; X | None -> X; tuple[X, ...] -> X
        args = [a for a in typing.get_args(typ) if a not in (type(None), Ellipsis)]
        kwargs.update(type=args[0] if args else typ,  # argparse's metavar but from the flag name
                      metavar=None if "choices" in kwargs else name[2:].replace("-", "_").upper())
    if "negation" in f.metadata:  # e.g. --bf16 / --fp32: either, not both
        group = group.add_mutually_exclusive_group()
    group.add_argument(name, dest=dest, **kwargs)
    if "negation" in f.metadata:
        group.add_argument(f.metadata["negation"], dest=dest, action="store_false",
                           help=f"the default: no {name}")


def build_parser() -> argparse.ArgumentParser:
    """One argument group per Config section; each flag's dest is "section.field"."""
    # Only the flags given reach the namespace: the dataclass defaults stay the only defaults, and a
    # preset can tell an explicit shape flag from an absent one.
    p = _Parser(description="Pretrain an OpenMoE model (Megatron-style flags).",
                argument_default=argparse.SUPPRESS)
    for section, cls, fields in _sections():
        g = p.add_argument_group(section, (cls.__doc__ or "").splitlines()[0])
        if section == "model":
            g.add_argument("--model-preset", default=None,
                           help=f"one of {', '.join(PRESETS)}; explicit shape flags override it")
        hints = typing.get_type_hints(cls)
        for dest, f in fields:
            _add_flag(g, dest, f, hints[f.name])
    return p


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Parse flags into a Config, checked by every rule that does not need the world size."""
    given = vars(build_parser().parse_args(argv))
    preset = given.pop("model_preset")
    fields = {dest: f for _, _, section in _sections() for dest, f in section}
    by_key = {_flag_name(f)[2:].replace("-", "_"): dest for dest, f in fields.items()}  # preset keys
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"--model-preset {preset!r} is unknown; choose one of {', '.join(PRESETS)}")
        given = {by_key[k]: v for k, v in PRESETS[preset].items()} | given
    hidden, heads = given.get("model.hidden_size"), given.get("model.num_attention_heads")
    if "model.kv_channels" not in given and hidden is not None and heads is not None:
        given["model.kv_channels"] = hidden // heads
    # The shape fields have no defaults; a preset lists them in the order the first missing one has
    # always been named.
    missing = [k for k in PRESETS["openmoe-tiny"]
               if by_key[k] not in given and fields[by_key[k]].default is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"model shape incomplete: pass --model-preset or --{missing[0].replace('_', '-')}")
    sections = {name: cls(**{f.name: tuple(v) if isinstance(v := given[dest], list) else v
                             for dest, f in section if dest in given})
                for name, cls, section in _sections()}  # nargs="+" gives a list; the field is a tuple
    return Config(**sections).validate(world_size=None)
