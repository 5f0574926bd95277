"""``ndo serve``'s options as data: generated from ``WorkerConfig``'s declaration, added to
argparse in one place, and read back into a ``WorkerConfig`` in one call.

``CliOption`` is an option as argparse needs it. ``worker_options`` derives one from each
``WORKER_OPTIONS`` record (``service/_config.py``) and its field's type and default; the CLI
declares its serve-only options (``--port``, ``--log-format``, ...) directly as ``CliOption``.
``add_options`` then treats every option alike:

* the flag is ``--<dest-with-dashes>`` unless declared otherwise; a ``bool`` default makes an
  on/off switch (``--no-journal``);
* the value comes from the flag, else ``NDO_<DEST>``, else the ``--config`` file, else the
  default; an empty variable counts as unset for an option whose default is ``None``;
* variable and file values reach argparse as strings, and argparse runs an option's ``type`` on
  a string default, so they are converted and checked exactly like a flag (``NDO_PORT=four`` is a
  usage error, exit 2);
* the help ends with ``[env NDO_<DEST>; default <value>]``.

A config file's keys are the options' dests (``check_file_keys``), so the file accepts exactly
what the command line does.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any, Final, Literal, get_args, get_origin

import msgspec

from ndo.ops._errors import ConfigFileError
from ndo.service import WORKER_OPTIONS, NatsAuth, WorkerConfig

__all__ = [
    "AUTH_OPTIONS",
    "CliOption",
    "add_options",
    "argument_type",
    "auth_from_args",
    "build_worker_config",
    "check_file_keys",
    "env_name",
    "flag_name",
    "worker_options",
]

_OFF: Final = frozenset({"0", "false", "no", "off"})
"""Values of an on/off variable (``NDO_JOURNAL=0``) that mean off; anything else means on."""
_PLAIN_TYPES: Final[tuple[type, ...]] = (int, float, str, Path)
"""Field types argparse converts with the type itself."""


class CliOption(msgspec.Struct, frozen=True, kw_only=True):
    """One ``ndo serve`` option, resolved to what argparse needs."""

    dest: str
    """Attribute of the parsed namespace; also the ``NDO_<DEST>`` variable and the file key."""
    help: str
    """The help sentence, before ``[env ...; default ...]``."""
    type: Callable[[str], Any] = str
    """Converts text (a flag, a variable, a file value) to the value; unused by a switch."""
    default: Any = None
    """Value when nothing sets the option; a ``bool`` makes the option an on/off switch."""
    default_text: str = ""
    """How help shows the default; empty: ``str(default)``, nothing for a ``None`` default."""
    choices: tuple[str, ...] = ()
    """Allowed flag values; empty: any."""
    flag: str = ""
    """The flag; empty: ``--<dest-with-dashes>``."""


AUTH_OPTIONS: Final = (
    CliOption(
        dest="nats_creds",
        type=Path,
        help="JWT credentials file (.creds) of the NATS user (operator/JWT mode)",
    ),
    CliOption(dest="nats_nkey", type=Path, help="file holding the NATS user's NKey seed (SU...)"),
    CliOption(dest="nats_token", help="NATS authentication token"),
    CliOption(
        dest="nats_user",
        help="NATS user name (with --nats-password; or put both in the URL: nats://u:p@host)",
    ),
    CliOption(dest="nats_password", help="password of --nats-user"),
    CliOption(
        dest="tls_ca",
        type=Path,
        help="PEM file of the CA that signed the NATS server's certificate (a private CA)",
    ),
    CliOption(
        dest="tls_cert",
        type=Path,
        help="PEM client certificate, for servers that verify clients (with --tls-key)",
    ),
    CliOption(dest="tls_key", type=Path, help="PEM private key of --tls-cert"),
)
"""How every command authenticates to NATS: the fields of ``NatsAuth``, as options."""


def auth_from_args(args: argparse.Namespace) -> NatsAuth:
    """The ``NatsAuth`` of parsed arguments that include ``AUTH_OPTIONS``.

    Raises:
        ValueError: contradictory settings or a missing file (the message names the option).
    """
    auth = NatsAuth(
        creds=args.nats_creds,
        nkey=args.nats_nkey,
        token=args.nats_token or "",
        user=args.nats_user or "",
        password=args.nats_password or "",
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )
    auth.check()
    return auth


def flag_name(option: CliOption) -> str:
    """The option's flag: declared, or ``--`` and its dest with dashes (``--max-active``)."""
    return option.flag or "--" + option.dest.replace("_", "-")


def env_name(option: CliOption) -> str:
    """The option's environment variable: ``NDO_`` and its dest in capitals (``NDO_MAX_ACTIVE``)."""
    return f"NDO_{option.dest.upper()}"


def argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Wrap a text parser so argparse shows its ``ValueError`` message as the usage error."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def worker_options(*, unset: Collection[str] = ()) -> tuple[CliOption, ...]:
    """The ``WorkerConfig`` fields operators can set, as options, in ``WORKER_OPTIONS`` order.

    Args:
        unset: fields whose option has no default, so that leaving it out means something the
            command decides (``ndo serve`` without ``--nats-url`` starts an embedded server).

    Raises:
        TypeError: a declared field's type needs a ``parse`` function and has none.
    """
    fields = {field.name: field for field in msgspec.structs.fields(WorkerConfig)}
    options: list[CliOption] = []
    for declared in WORKER_OPTIONS:
        field = fields[declared.field]
        choices: tuple[str, ...] = ()
        if declared.parse is not None:
            kind: Callable[[str], Any] = argument_type(declared.parse)
        elif get_origin(field.type) is Literal:
            kind, choices = str, tuple(str(choice) for choice in get_args(field.type))
        elif field.type in (*_PLAIN_TYPES, bool):
            kind = field.type
        else:
            raise TypeError(f"WorkerOption {declared.field!r} of type {field.type} needs parse=")
        unset_here = declared.field in unset
        options.append(
            CliOption(
                dest=declared.field,
                help=declared.help,
                type=kind,
                default=None if unset_here else field.default,
                default_text="" if unset_here else declared.default_text,
                choices=choices,
                flag=declared.flag,
            )
        )
    return tuple(options)


def _help(option: CliOption) -> str:
    """The option's help with its variable and default: ``... [env NDO_X; default 3]``."""
    if isinstance(option.default, bool):
        return f"{option.help} [env {env_name(option)}={int(not option.default)}]"
    shown = option.default_text or ("" if option.default is None else str(option.default))
    return f"{option.help} [env {env_name(option)}" + (f"; default {shown}]" if shown else "]")


def _switch(text: str) -> bool:
    """An on/off variable's value: off for 0, false, no or off (any case), else on."""
    return text.strip().lower() not in _OFF


def _default(option: CliOption, file_values: Mapping[str, Any]) -> Any:
    """The option's value when its flag is absent: the variable, else the file, else default."""
    switch = isinstance(option.default, bool)
    text = os.environ.get(env_name(option))
    if text is not None and (text or option.default is not None):
        return _switch(text) if switch else text
    if option.dest in file_values:
        value = file_values[option.dest]
        if switch:
            return value if isinstance(value, bool) else _switch(str(value))
        return str(value)  # through the option's type, like a flag (TOML numbers included)
    return option.default


def add_options(
    parser: argparse.ArgumentParser,
    options: Iterable[CliOption],
    file_values: Mapping[str, Any] | None = None,
) -> None:
    """Add ``options`` to ``parser``, their defaults taken from ``NDO_*`` and ``file_values``.

    Args:
        parser: the parser that gets the options.
        options: the options, in help order.
        file_values: a config file's values by dest (``check_file_keys`` first).
    """
    for option in options:
        default = _default(option, file_values or {})
        if isinstance(option.default, bool):
            parser.add_argument(
                flag_name(option),
                dest=option.dest,
                action="store_false" if option.default else "store_true",
                default=default,
                help=_help(option),
            )
        else:
            parser.add_argument(
                flag_name(option),
                dest=option.dest,
                type=option.type,
                default=default,
                choices=option.choices or None,
                help=_help(option),
            )


def check_file_keys(
    values: Mapping[str, Any], options: Iterable[CliOption], *, extra: Collection[str] = ()
) -> None:
    """Refuse a config file that names an option the command does not have.

    Args:
        values: the file's values by dest (``data_dir``).
        options: the command's options.
        extra: further keys the command accepts (``modules``).

    Raises:
        ConfigFileError: an unknown key; the message lists the valid ones.
    """
    known = {option.dest for option in options} | set(extra)
    unknown = sorted(set(values) - known)
    if unknown:
        valid = ", ".join(sorted(name.replace("_", "-") for name in known))
        raise ConfigFileError(f"unknown option(s) {', '.join(unknown)}; valid options: {valid}")


def build_worker_config(args: argparse.Namespace) -> WorkerConfig:
    """The ``WorkerConfig`` of parsed ``ndo serve`` arguments.

    An option left unset (``None``, see ``worker_options(unset=...)``) keeps the field's default.

    Raises:
        ValueError: a value ``WorkerConfig`` refuses; the message says how to fix it.
    """
    values = {option.field: getattr(args, option.field) for option in WORKER_OPTIONS}
    values["auth"] = auth_from_args(args)
    return WorkerConfig(**{name: value for name, value in values.items() if value is not None})
