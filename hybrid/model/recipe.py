"""Recipes: YAML -> a frozen, validated model configuration.

A recipe names its mixers once, with their options, and lays the layers out with a pattern::

    # GLA + KVM, three GLA layers per KVM layer.
    model:
      vocab_size: 256
      d_model: 128
      n_layers: 8
      layers: "GGGK*2"          # or a list: [gla, gla, gla, kvm, ...] (names or symbols)
      mixers:
        gla: {num_heads: 2}
        kvm: {num_heads: 2, chunk_len: 32}
      block: {norm: rmsnorm, mlp: swiglu}

Pattern grammar: letters are mixer symbols (``blocks.registry``; an alias under ``mixers`` may
declare its own), ``*N`` repeats the group written just before it (the letters since the last space
or bracket, or a bracketed group), spaces separate groups: ``"GGGK*3"``, ``"A K*11"``,
``"(SK)*6"``. The expanded layer list must have exactly ``n_layers`` entries.

``extends: other.yaml`` (a path relative to the recipe, or a name under ``recipes/``) starts from
another recipe and deep-merges this one over it; a key set to ``null`` resets it to its default.

Every value is type- and range-checked; a problem raises ``RecipeError`` naming the file, the YAML
path and the fix, with a did-you-mean for misspelt keys and mixers. Beyond each option's own rules,
every number is checked where it is read: a float is finite (unless its default is infinite, like
Mamba2's ``dt_limit``), an integer fits in 64 bits and is never negative, and the sizes the model
would need are checked before anything is allocated (``hybrid.model.limits``). A key written twice
in one mapping is an error naming both lines (``hybrid.formats.text_files``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from blocks.config import ConfigError, require, require_choice, require_positive
from blocks.errors import InputError
from blocks.registry import UnknownMixerError, get_mixer
from hybrid.formats.text_files import TextFileError, read_yaml_file
from hybrid.formats.tokenizer import TokenizerError, check_spec
from hybrid.model.limits import MAX_LAYERS, check_model_size


def shipped_recipes_dir() -> Path:
    """The shipped recipes: the repository's top-level ``recipes/`` folder, which an installed wheel
    carries as the package data ``hybrid/recipes`` (pyproject.toml maps one onto the other)."""
    installed = Path(__file__).resolve().parents[1] / "recipes"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[2] / "recipes"


RECIPES_DIR = shipped_recipes_dir()

NORMS = ("layernorm", "rmsnorm")
MLPS = ("relu2", "swiglu", "gelu")
INITS = ("kvm_paper", "normal")
TOP_LEVEL_KEYS = ("extends", "model", "tokenizer", "train")


class RecipeError(InputError):
    """A recipe that cannot be used; the message names the file, the YAML path and the fix."""


# ----------------------------------------------------------------------------- configuration objects

@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """What surrounds each mixer: ``x += rs * mixer(norm(x)); x += rs * mlp(norm(x))``.

    The paper's backbone (docs/kvm.md §2): LayerNorm, ReLU² MLP with token shift, residual scale.
    The Llama family: RMSNorm, SwiGLU, no token shift.
    """

    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorm bias (RMSNorm has none)
    mlp: str = "relu2"  # relu2 (x -> relu(W1 x)^2 -> W2) | swiglu (Llama) | gelu
    mlp_hidden: int | None = None  # None: mlp_expansion * d_model, rounded down to a multiple of 32
    mlp_expansion: float = 4.0
    mlp_bias: bool = False
    mlp_token_shift: bool = False  # mix each MLP input with the previous token's (the first sees zero)
    residual_scale: float = 1.0

    def __post_init__(self):
        require_choice("norm", self.norm, NORMS)
        require(self.norm_eps > 0, "norm_eps", f"must be > 0, got {self.norm_eps}")
        require_choice("mlp", self.mlp, MLPS)
        if self.mlp_hidden is not None:
            require_positive("mlp_hidden", self.mlp_hidden)
        require(self.mlp_expansion > 0, "mlp_expansion", f"must be > 0, got {self.mlp_expansion}")
        require(self.residual_scale > 0, "residual_scale", f"must be > 0, got {self.residual_scale}")

    def hidden_size(self, d_model: int) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return max(32, int(self.mlp_expansion * d_model) // 32 * 32)


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    """One layer: the mixer's registry name, the recipe's name for it, and its validated options."""

    name: str  # key under ``mixers`` (an alias or the registry name)
    mixer: str  # registry name
    options: Any  # the mixer's Config dataclass instance


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A whole language model: embedding -> blocks -> norm -> head."""

    vocab_size: int
    d_model: int
    n_layers: int
    layers: tuple[LayerConfig, ...]
    block: BlockConfig = BlockConfig()
    embedding_norm: bool = False  # normalise the embeddings (the paper's ln_emb)
    tie_embeddings: bool = True  # the head reuses the embedding matrix
    logit_softcap: float | None = None  # tanh soft cap on the logits
    init: str = "normal"  # kvm_paper (docs/kvm.md §2) | normal (std init_std, scaled residual outputs)
    init_std: float = 0.02

    def fingerprint(self) -> str:
        """A short hash of the architecture: saved states and checkpoints carry it."""
        text = json.dumps(model_to_dict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def state_kinds(self) -> list[str]:
        return [get_mixer(layer.mixer).state_kind for layer in self.layers]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A loaded recipe: the model, the tokenizer choice and the raw training section (issue-5 owner)."""

    model: ModelConfig
    tokenizer: dict
    train: dict
    source: str = "<dict>"

    def to_dict(self) -> dict:
        """The expanded recipe (explicit layer list): loading it back gives the same recipe."""
        out: dict[str, Any] = {"model": model_to_dict(self.model), "tokenizer": dict(self.tokenizer)}
        if self.train:
            out["train"] = copy.deepcopy(self.train)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------- loading

def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe file (or a name under ``recipes/``), resolve ``extends:`` and validate it."""
    path = resolve_recipe_path(path)
    return recipe_from_dict(_read_with_extends(path, ()), source=str(path))


def resolve_recipe_path(path: str | Path, relative_to: Path | None = None) -> Path:
    """A recipe path as given, relative to the extending recipe, or under ``recipes/`` (``.yaml`` optional)."""
    text = str(path)
    where = f"{relative_to}: extends: " if relative_to is not None else ""
    if not text.strip() or "\0" in text:
        raise RecipeError(f"{where}{_shown(text)} is not a recipe path or name: name a recipe file, or one under "
                          f"{RECIPES_DIR} (see `hybrid recipes`)")
    candidates = [Path(text)]
    if relative_to is not None:
        candidates.insert(0, relative_to.parent / text)
    candidates.append(RECIPES_DIR / text)
    for candidate in list(candidates):
        if candidate.suffix not in (".yaml", ".yml"):
            candidates.append(candidate.with_name(candidate.name + ".yaml"))
    for candidate in candidates:
        try:
            if candidate.is_file():
                return candidate.resolve()
        except OSError:  # a name too long for the file system, a folder we may not read
            continue
    known = sorted(str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in RECIPES_DIR.rglob("*.yaml"))
    close = difflib.get_close_matches(text.removesuffix(".yaml"), known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise RecipeError(f"{where}recipe {_shown(text)} not found (looked in the current directory"
                      f"{', next to the extending recipe' if relative_to else ''} and in {RECIPES_DIR}).{hint} "
                      f"Shipped recipes: {', '.join(known) or 'none'}")


def _read_yaml(path: Path) -> dict:
    try:
        data = read_yaml_file(path)
    except TextFileError as err:
        raise RecipeError(str(err)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with a 'model:' section, got {type(data).__name__}")
    return data


def _read_with_extends(path: Path, seen: tuple[Path, ...]) -> dict:
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise RecipeError(f"{path}: 'extends' loops back to itself: {chain}")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError(f"{path}: extends: must be a recipe path or name, got {_shown(parent)}")
    base = _read_with_extends(resolve_recipe_path(parent, relative_to=path), (*seen, path))
    return deep_merge(base, data)


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` over ``base``, recursively for mappings; ``None`` deletes the key (back to default).
    A layer list or pattern replaces the parent's; ``mixers`` merge like any mapping, option by
    option (set a mixer to ``null`` to drop it)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def recipe_from_dict(data: dict, source: str = "<dict>") -> Recipe:
    """Validate a recipe mapping (``extends`` already resolved)."""
    where = f"{source}: " if source else ""
    try:
        _check_keys(data, TOP_LEVEL_KEYS, "")
        if "extends" in data:  # only files are merged with their parents; never drop it silently
            raise ConfigError("extends", "is resolved when a recipe file is read (load_recipe); "
                                         "pass recipe_from_dict the merged mapping")
        if "model" not in data:
            raise ConfigError("model", "missing: a recipe needs a 'model:' section")
        model = model_from_dict(data["model"])
        tokenizer = data.get("tokenizer") or {"type": "bytes"}
        check_spec(tokenizer)
        train = data.get("train") or {}
        if not isinstance(train, dict):
            raise ConfigError("train", f"must be a mapping, got {type(train).__name__}")
    except (ConfigError, UnknownMixerError, TokenizerError) as err:
        raise RecipeError(f"{where}{err}") from None
    return Recipe(model, tokenizer, train, source)


_MODEL_FIELDS = ("vocab_size", "d_model", "n_layers", "layers", "mixers", "block", "embedding_norm",
                 "tie_embeddings", "logit_softcap", "init", "init_std")


def model_from_dict(data: Any) -> ModelConfig:
    """The ``model:`` section -> ``ModelConfig`` (errors are ``ConfigError`` with a ``model.`` path)."""
    if not isinstance(data, dict):
        raise ConfigError("model", f"must be a mapping, got {type(data).__name__}")
    _check_keys(data, _MODEL_FIELDS, "model.")
    for key in ("vocab_size", "d_model", "n_layers", "layers", "mixers"):
        if key not in data:
            raise ConfigError(f"model.{key}", "missing (required)")
    scalars = {k: v for k, v in data.items() if k not in ("layers", "mixers", "block")}
    head = build_dataclass(_ModelScalars, scalars, "model.")
    block = build_dataclass(BlockConfig, data.get("block") or {}, "model.block.")
    mixers = _mixer_table(data["mixers"])
    names = expand_layers(data["layers"], mixers, "model.layers")
    if len(names) != head.n_layers:
        raise ConfigError("model.layers", f"expands to {len(names)} layers ({_summary(names, mixers)}), "
                                          f"but n_layers is {head.n_layers}: fix the pattern or n_layers")
    unused = sorted(set(mixers) - set(names))
    if unused:
        raise ConfigError(f"model.mixers.{unused[0]}", "is configured but no layer uses it: "
                                                      "remove it or add it to model.layers")
    built = {}
    for name in dict.fromkeys(names):
        entry = mixers[name]
        built[name] = LayerConfig(name, entry.mixer, build_dataclass(
            get_mixer(entry.mixer).config_cls, entry.options, f"model.mixers.{name}."))
    config = ModelConfig(layers=tuple(built[n] for n in names), block=block, **dataclasses.asdict(head))
    first_rwkv7 = next((layer for layer in config.layers if layer.mixer == "rwkv7"), None)
    if first_rwkv7 is not None and first_rwkv7.options.v_first_source is False:
        raise ConfigError(f"model.mixers.{first_rwkv7.name}.v_first_source",
                          "the first RWKV-7 layer starts the v_first stream that later ones mix towards: set it "
                          "true, or null (the first one starts it)")
    check_model_size(config)
    return config


@dataclasses.dataclass(frozen=True)
class _ModelScalars:
    vocab_size: int
    d_model: int
    n_layers: int
    embedding_norm: bool = False
    tie_embeddings: bool = True
    logit_softcap: float | None = None
    init: str = "normal"
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers"):
            require_positive(name, getattr(self, name))
        require(self.n_layers <= MAX_LAYERS, "n_layers", f"must be at most {MAX_LAYERS}, got {self.n_layers}")
        require(self.logit_softcap is None or self.logit_softcap > 0, "logit_softcap",
                f"must be > 0 or null, got {self.logit_softcap}")
        require_choice("init", self.init, INITS)
        require(self.init_std > 0, "init_std", f"must be > 0, got {self.init_std}")


@dataclasses.dataclass(frozen=True)
class _MixerEntry:
    mixer: str  # registry name
    options: dict
    symbol: str  # the pattern letter that lays this entry out


def _mixer_table(data: Any) -> dict[str, _MixerEntry]:
    """``mixers:`` -> {recipe name: entry}. An entry is named after a registry mixer, or is an alias
    with ``type: <registry name>`` and its own pattern letter ``symbol: X``."""
    if not isinstance(data, dict) or not data:
        raise ConfigError("model.mixers", "must map mixer names to their options, e.g. {kvm: {num_heads: 4}}")
    table: dict[str, _MixerEntry] = {}
    for name, options in data.items():
        path = f"model.mixers.{name}"
        if not isinstance(name, str):
            raise ConfigError(path, f"a mixer entry is named by text (a mixer like 'kvm', or a name of your own "
                                    f"with 'type: <mixer>'), got the {type(name).__name__} {name!r}: quote it")
        options = dict(options or {}) if isinstance(options, dict | None) else None
        if options is None:
            raise ConfigError(path, f"must be a mapping of options, got {_shown(data[name])}")
        is_alias = "type" in options
        spec_name = options.pop("type", name)
        try:
            spec = get_mixer(spec_name)
        except UnknownMixerError as err:
            fix = "" if is_alias else " (or name your own entry and give it 'type: <mixer>')"
            raise ConfigError(f"{path}{'.type' if is_alias else ''}", f"{err}{fix}") from None
        symbol = options.pop("symbol", spec.symbol)
        if not (isinstance(symbol, str) and len(symbol) == 1 and symbol.isalpha()):
            raise ConfigError(f"{path}.symbol", f"must be one letter, got {_shown(symbol)}")
        table[str(name)] = _MixerEntry(spec_name, options, symbol)
    return table


def expand_layers(layers: Any, mixers: dict[str, _MixerEntry], path: str) -> list[str]:
    """A pattern string or an explicit list -> the recipe mixer name of each layer.

    Two entries may share a letter (an alias without its own ``symbol`` keeps its mixer's) as long
    as no layer is laid out by that letter: the expanded form (``Recipe.to_dict``) lists names."""
    symbols: dict[str, list[str]] = {}
    for name, entry in mixers.items():
        symbols.setdefault(entry.symbol, []).append(name)

    def by_symbol(letter: str) -> str:
        if len(symbols[letter]) > 1:
            first, other = symbols[letter][:2]
            raise ConfigError(f"model.mixers.{other}.symbol", f"{letter!r} already lays out {first!r}; "
                                                             "give this entry its own 'symbol: X'")
        return symbols[letter][0]

    if isinstance(layers, str):
        names = []
        for letter in expand_pattern(layers, path):
            if letter not in symbols:
                valid = ", ".join(f"{s}={'/'.join(n)}" for s, n in sorted(symbols.items()))
                raise ConfigError(path, f"symbol {letter!r} in {layers!r} names no mixer of this recipe "
                                        f"(its symbols: {valid}); configure that mixer under model.mixers")
            names.append(by_symbol(letter))
        return names
    if isinstance(layers, list) and layers:
        names = []
        for i, item in enumerate(layers):
            if isinstance(item, str) and item in mixers:
                names.append(item)
            elif isinstance(item, str) and item in symbols:
                names.append(by_symbol(item))
            else:
                close = difflib.get_close_matches(str(item), list(mixers), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{path}[{i}]", f"{item!r} is not a mixer of this recipe.{hint} "
                                                  f"Configured: {', '.join(mixers)}")
        return names
    raise ConfigError(path, "must be a pattern string like 'GGGK*3' or a non-empty list of mixer names, "
                            f"got {_shown(layers)}")


def expand_pattern(pattern: str, path: str = "pattern") -> list[str]:
    """``"GGGK*3"`` -> GGGK GGGK GGGK; ``"A K*3"`` -> A K K K; ``"(SK)*2 A"`` -> S K S K A.

    A group is a run of letters or a bracketed pattern; ``*N`` right after a group repeats it."""
    pos = 0

    def fail(message: str) -> ConfigError:
        return ConfigError(path, f"bad pattern {_shown(pattern)} at position {pos}: {message}")

    def skip_spaces() -> None:
        nonlocal pos
        while pos < len(pattern) and pattern[pos].isspace():
            pos += 1

    def sequence(depth: int) -> list[str]:
        nonlocal pos
        out: list[str] = []
        while True:
            skip_spaces()
            if pos == len(pattern) or pattern[pos] == ")":
                return out
            if pattern[pos] == "(":
                pos += 1
                group = sequence(depth + 1)
                if pos == len(pattern) or pattern[pos] != ")":
                    raise fail("missing ')'")
                pos += 1
            elif pattern[pos].isalpha():
                begin = pos
                while pos < len(pattern) and pattern[pos].isalpha():
                    pos += 1
                group = list(pattern[begin:pos])
            else:
                raise fail(f"unexpected {pattern[pos]!r} (letters, '*N', brackets and spaces only)")
            skip_spaces()
            if pos < len(pattern) and pattern[pos] == "*":
                pos += 1
                skip_spaces()
                begin = pos
                while pos < len(pattern) and pattern[pos].isdigit():
                    pos += 1
                digits = pattern[begin:pos].lstrip("0")
                repeat = int(digits or "0") if len(digits) <= 9 else MAX_LAYERS + 1  # more digits: too many
                if begin == pos or repeat < 1:
                    raise fail("'*' must be followed by a repeat count >= 1")
                if len(out) + len(group) * repeat > MAX_LAYERS:
                    raise fail(f"'*{pattern[begin:pos]}' makes more than the {MAX_LAYERS} layers a model may have")
                group = group * repeat
            out.extend(group)
            if len(out) > MAX_LAYERS:
                raise fail(f"more than the {MAX_LAYERS} layers a model may have")

    letters = sequence(0)
    if pos != len(pattern):
        raise fail("unmatched ')'")
    if not letters:
        raise fail("no layers")
    return letters


def _summary(names: list[str], mixers: dict) -> str:
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return ", ".join(f"{c}x {n}" for n, c in counts.items())


# ----------------------------------------------------------------------------- strict dataclasses

def _check_keys(data: dict, valid: tuple[str, ...] | list[str], prefix: str) -> None:
    for key in data:
        if key not in valid:
            close = difflib.get_close_matches(str(key), list(valid), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{prefix}{key}", f"unknown key.{hint} Valid keys: {', '.join(valid)}")


def build_dataclass(cls: type, data: Any, prefix: str):
    """``cls(**data)`` with strict keys and types; errors become ``ConfigError`` with the YAML path."""
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip("."), f"must be a mapping of options, got {_shown(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    _check_keys(data, list(fields), prefix)
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(value, hints[name], f"{prefix}{name}", _infinite_default(fields[name]))
              for name, value in data.items()}
    try:
        built = cls(**values)
    except ConfigError as err:
        raise ConfigError(f"{prefix}{err.field}", err.reason) from None
    except TypeError as err:  # a required option is missing
        raise ConfigError(prefix.rstrip("."), str(err).split(".__init__() ")[-1]) from None
    for name, value in values.items():  # after the class's own rules, whose messages say more
        _require_not_negative(value, f"{prefix}{name}")
    return built


INT64 = 2 ** 63


def _infinite_default(field: dataclasses.Field) -> bool:
    """Whether a field's default is or holds an infinite float (then so may its value)."""
    default = field.default if isinstance(field.default, tuple) else (field.default,)
    return any(isinstance(v, float) and math.isinf(v) for v in default)


def _require_not_negative(value: Any, path: str) -> None:
    """Integers in a recipe are counts, sizes, lengths and seeds: never negative."""
    if isinstance(value, tuple):
        for i, item in enumerate(value):
            _require_not_negative(item, f"{path}[{i}]")
    elif isinstance(value, int) and not isinstance(value, bool) and value < 0:
        raise ConfigError(path, f"must be >= 0, got {value}")


def _shown(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut short for a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _union_members(hint: Any) -> tuple:
    """``int | None`` -> (int, NoneType); a plain annotation -> (itself,)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def _coerce(value: Any, hint: Any, path: str, infinite_ok: bool = False) -> Any:
    """Check ``value`` against a field annotation (int, float, bool, str, X | None, tuples). Integers
    must fit in 64 bits; floats must be finite unless ``infinite_ok``."""
    options = _union_members(hint)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(path, "must be set (null is not allowed here)")
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            if not -INT64 <= value < INT64:
                raise ConfigError(path, f"{_shown(value)} does not fit in 64 bits")
            return value
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value) if isinstance(value, float) or abs(value) < 2 ** 1023 else math.inf  # a huge int
            if math.isnan(number) or (math.isinf(number) and not infinite_ok):
                raise ConfigError(path, f"must be a finite number, got {_shown(value)}")
            return number
        if option is str and isinstance(value, str):
            return value
        if typing.get_origin(option) is tuple and isinstance(value, list | tuple):
            items = typing.get_args(option)
            if items and items[-1] is not Ellipsis and len(items) != len(value):
                raise ConfigError(path, f"must be a list of {len(items)} values, got {_shown(list(value))}")
            kinds = [items[0]] * len(value) if items[-1:] == (Ellipsis,) else items or [Any] * len(value)
            return tuple(_coerce(v, k, f"{path}[{i}]", infinite_ok) for i, (v, k) in enumerate(zip(value, kinds)))
        if option is Any:
            return value
    wanted = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
    raise ConfigError(path, f"must be {wanted}, got {_shown(value)} ({type(value).__name__})")


# ----------------------------------------------------------------------------- back to plain data

def model_to_dict(model: ModelConfig) -> dict:
    """The expanded ``model:`` section: an explicit layer list and each mixer's full options, as plain
    YAML data (lists, not tuples; a float option is a float even if its default was written as an
    int), so the fingerprint does not depend on how a config was built."""
    mixers = {}
    for layer in model.layers:
        if layer.name not in mixers:
            options = _plain_fields(layer.options)
            if layer.name != layer.mixer:
                options = {"type": layer.mixer, **options}
            mixers[layer.name] = options
    out = _plain_fields(model, skip=("layers", "block"))
    out["layers"] = [layer.name for layer in model.layers]
    out["mixers"] = mixers
    out["block"] = _plain_fields(model.block)
    return out


def _plain_fields(obj: Any, skip: tuple[str, ...] = ()) -> dict:
    """A config dataclass's fields as plain data, each value in the form its annotation reads."""
    hints = typing.get_type_hints(type(obj))
    return {f.name: _plain(getattr(obj, f.name), hints[f.name]) for f in dataclasses.fields(obj) if f.name not in skip}


def _plain(value: Any, hint: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v, Any) for v in value]
    options = _union_members(hint)
    if isinstance(value, int) and not isinstance(value, bool) and float in options and int not in options:
        return float(value)
    return value
