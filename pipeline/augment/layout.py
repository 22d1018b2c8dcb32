"""`ParamLayout`: the named slices of a view's int32 parameter vector, which a store manifest records.

A vector is, in this order: `base` (the kind's fields, `KINDS`), `recipe` (the recipe seed, with a
recipe), `mix` (the `Mix` fields, with mixup or cutmix) and `partner` (the partner's base and recipe
fields, p_*, with mixup or cutmix).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.augment.kinds import KINDS
from pipeline.augment.mix import MIX, mixes
from pipeline.augment.recipe import RECIPE, has_recipe
from pipeline.config import AugmentConfig
from pipeline.errors import ConfigError


@dataclass(frozen=True, eq=False)
class ParamLayout:
    """Named slices of a view's parameter vector, in its order: `base` (the kind's fields), `recipe` (the
    recipe seed), `mix` (the `Mix` fields) and `partner` (the partner's base and recipe fields), each empty
    where the config has no such part. `own` (base and recipe) indexes a view's own fields and, as
    `base` and `recipe` do, the partner's fields taken out by `partner`."""

    names: tuple[str, ...]
    sections: dict[str, slice]

    @classmethod
    def of(cls, cfg: AugmentConfig) -> ParamLayout:
        if cfg.kind not in KINDS:  # also checked by config validation; here for direct use
            raise ConfigError(f"augment.kind: unknown '{cfg.kind}' (known: {', '.join(KINDS)})")
        recipe = RECIPE if has_recipe(cfg) else ()
        own = KINDS[cfg.kind].fields + recipe
        parts = {"base": KINDS[cfg.kind].fields, "recipe": recipe, "mix": MIX if mixes(cfg) else (),
                 "partner": tuple(f"p_{name}" for name in own) if mixes(cfg) else ()}
        sections, start = {}, 0
        for name, fields in parts.items():
            sections[name] = slice(start, start + len(fields))
            start += len(fields)
        return cls(tuple(name for fields in parts.values() for name in fields), sections)

    def __getitem__(self, name: str) -> slice:
        if name == "own":
            return slice(self.sections["base"].start, self.sections["recipe"].stop)
        return self.sections[name]

    def __len__(self) -> int:
        return len(self.names)

    def to_manifest(self) -> dict[str, list[int]]:
        """{section: [start, stop]}: how a store records the layout of its view_params."""
        return {name: [s.start, s.stop] for name, s in self.sections.items()}
