"""Everything a running engine reads from disk, loaded once and checked against itself:
channels (channels/*.yaml), mappings (mappings/*.yaml, templates, tables) and the
agendas (mappings/agendas.yaml). ``koppel check`` and ``koppel run`` both call
``load_bundle``, so a config that checks is a config that runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import ConfigError, ConfigProblem, EngineConfig, load_config, types_cover, unreachable_route_types

AGENDAS_FILE = "agendas.yaml"


@dataclass(frozen=True, slots=True, kw_only=True)
class Bundle:
    config: EngineConfig
    mappings: Any | None  # engine.mapping.MappingSet; None when no route maps
    book: Any | None  # engine.core.agenda.AgendaBook


def load_bundle(channels_dir: Path, mappings_dir: Path) -> Bundle:
    """Load and cross-check; raise ConfigError listing every problem."""
    mappings_dir = Path(mappings_dir)
    problems: list[ConfigProblem] = []
    config = None
    try:
        config = load_config(Path(channels_dir), mappings_dir)
    except ConfigError as error:
        problems.extend(error.problems)
    mappings = book = None
    has_mapping_files = mappings_dir.is_dir() and any(
        p.name != AGENDAS_FILE for p in mappings_dir.glob("*.yaml")
    )
    if has_mapping_files:
        from engine.mapping import load_mappings

        try:
            mappings = load_mappings(mappings_dir)
        except ConfigError as error:
            problems.extend(error.problems)
    if (mappings_dir / AGENDAS_FILE).is_file():
        from engine.agendas_config import load_agendas

        try:
            book = load_agendas(mappings_dir / AGENDAS_FILE)
        except ConfigError as error:
            problems.extend(error.problems)
    mappings_failed = has_mapping_files and mappings is None
    if config is not None and not mappings_failed:  # a mapping that failed to load is reported already
        problems.extend(_cross_check(config, mappings, book, mappings_dir))
    if problems:
        raise ConfigError(problems)
    return Bundle(config=config, mappings=mappings, book=book)


def _taken(channel, index: int, route) -> frozenset[str] | None:
    """The types that can reach a route: its own that the channel accepts (one it refuses is
    answered AR first: a warning of `koppel check`), else the channel's accepted ones when no
    field condition narrows them; None: any, or not known."""
    if route.types is not None:
        refused = {named for at, named in unreachable_route_types(channel) if at == index}
        return frozenset(route.types - refused)
    if route.fields or route.unless:
        return None
    return channel.accept.types


def _not_mapped_by(declared: tuple[str, ...], taken: frozenset[str] | None) -> list[str]:
    """The types a route takes (its own, else its channel's accepted; None: any) that its
    mapping does not declare: ``SRM`` declares every SRM trigger, a route's ``SRM`` needs
    one SRM trigger declared."""
    if taken is None:
        return []
    return sorted(t for t in taken if not types_cover(declared, t))


def _cross_check(config: EngineConfig, mappings, book, mappings_dir: Path) -> list[ConfigProblem]:
    problems = []
    names = {d.name for d in config.destinations}
    used = False
    for channel in config.channels:
        for index, route in enumerate(channel.routes):
            if route.map is None:
                continue
            used = True
            path = f"routes[{index}].map"
            line, col = channel.mark(path)
            where = dict(file=str(channel.file), line=line, col=col, path=path)
            if mappings is None:
                problems.append(ConfigProblem(**where, message=f"mapping {route.map!r}: no mapping files in {mappings_dir}"))
                continue
            try:
                mapping = mappings.mapping(route.map)
            except KeyError:
                known = ", ".join(sorted(m.name for m in mappings.mappings)) or "none"
                problems.append(ConfigProblem(**where, message=f"unknown mapping {route.map!r} (mappings: {known})"))
                continue
            strangers = _not_mapped_by(mapping.types, _taken(channel, index, route))
            if strangers:
                problems.append(ConfigProblem(**where, message=(
                    f"mapping {route.map!r} maps {', '.join(mapping.types)}, not {', '.join(strangers)}, which this "
                    "route takes (every one would be a mapping error): narrow the route's when.types or pick its mapping")))
            for outbound in mapping.outbound:
                if outbound.to not in names:
                    to_line, to_col, to_path = outbound.to_at
                    problem = ConfigProblem(
                        file=str(mapping.file), line=to_line or None, col=to_col or None, path=to_path,
                        message=f"unknown destination {outbound.to!r} (channels define: {', '.join(sorted(names)) or 'none'})",
                    )
                    if problem not in problems:  # once, however many routes use the mapping
                        problems.append(problem)
    if used and book is None and not (mappings_dir / AGENDAS_FILE).is_file():  # (one that fails is reported)
        problems.append(ConfigProblem(file=str(mappings_dir / AGENDAS_FILE), line=None, col=None, path="(file)",
                                      message="routes map messages but there is no agendas.yaml"))
    return problems
