"""Tests of the generic config machinery in ``sftrl.configtools`` on a small sample schema."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Literal, Optional

import pytest
import yaml

from sftrl.configtools import (
    ConfigError,
    FieldInfo,
    Range,
    apply_overrides,
    check_ranges,
    check_schema,
    config_reference_markdown,
    doc_field,
    dump_yaml,
    from_dict,
    iter_fields,
    load_config,
    load_yaml_file,
    parse_override,
    to_dict,
    type_string,
)

# --------------------------------------------------------------------------- sample schema
# Module level and with ``from __future__ import annotations`` on purpose: the annotations
# are strings and must be resolved with typing.get_type_hints.


@dataclass(frozen=True)
class Optim:
    lr: float = doc_field(1e-3, "Learning rate.")
    betas: tuple[float, ...] = doc_field((0.9, 0.999), "Adam betas.")
    schedule: Literal["constant", "cosine"] = doc_field("constant", "Learning-rate schedule.")


@dataclass(frozen=True)
class Trainer:
    n_critic: int = doc_field(5, "Critic steps per generator step.")
    lr: float = doc_field(3e-4, "Policy learning rate.")
    use_ema: bool = doc_field(True, "Keep an EMA copy of the weights.")
    max_steps: int | None = doc_field(None, "Stop after this many steps (null: never).")
    grad_clip: Optional[float] = doc_field(1.0, "Clip gradient norm (null: no clipping).")  # noqa: UP045
    hidden: tuple[int, ...] = doc_field((64, 64), "Hidden layer widths.")
    tags: tuple[str, ...] = doc_field((), "Free-form run tags.")
    device: str = doc_field("cpu", "Where to train.", choices=("cpu", "cuda"))
    optim: Optim = doc_field(doc="Optimizer settings.", default_factory=Optim)

    def validate(self) -> None:  # must NOT be called by from_dict
        raise AssertionError("from_dict called validate()")


@dataclass(frozen=True)
class Model:
    kind: Literal["mlp", "unet"] = doc_field("mlp", "Network architecture.")
    shape: tuple[int, str] = doc_field((8, "relu"), "Width and activation.")


@dataclass(frozen=True)
class Root:
    seed: int = doc_field(0, "Random seed.")
    name: str = doc_field("run", "Run name.")
    trainer: Trainer = doc_field(doc="Trainer settings.", default_factory=Trainer)
    model: Model = doc_field(doc="Model settings.", default_factory=Model)


# Deliberately broken schemas for check_schema().


@dataclass(frozen=True)
class _BadLeaf:
    widths: list[int] = doc_field(default_factory=list, doc="A list, not a tuple.")
    undocumented: int = 3
    wrong_default: int = doc_field("three", "A str default for an int field.")
    bad_choice: str = doc_field("x", "Default outside choices.", choices=("a", "b"))


@dataclass
class _NotFrozen:
    x: int = doc_field(1, "An int.")


@dataclass(frozen=True)
class _BadRoot:
    leaf: _BadLeaf = doc_field(doc="Broken leaf section.", default_factory=_BadLeaf)
    loose: _NotFrozen = doc_field(doc="Mutable section.", default_factory=_NotFrozen)


def _custom() -> Root:
    return Root(
        seed=7,
        name="exp-1",
        trainer=Trainer(
            n_critic=2,
            lr=1e-5,
            use_ema=False,
            max_steps=1000,
            grad_clip=None,
            hidden=(128, 32, 8),
            tags=("a", "b c"),
            device="cuda",
            optim=Optim(lr=0.5, betas=(0.5,), schedule="cosine"),
        ),
        model=Model(kind="unet", shape=(16, "gelu")),
    )


def _error(cls: type, data: object, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        from_dict(cls, data, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# --------------------------------------------------------------------------- building


def test_empty_data_gives_all_defaults() -> None:
    assert from_dict(Root, {}) == Root()
    assert from_dict(Root, None) == Root()
    cfg = from_dict(Root, {"trainer": None})  # a section with everything commented out
    assert cfg.trainer == Trainer()
    assert cfg.trainer.optim.betas == (0.9, 0.999)


def test_partial_section_keeps_other_defaults() -> None:
    cfg = from_dict(Root, {"trainer": {"optim": {"lr": 0.25}}, "seed": 3})
    assert cfg.seed == 3
    assert cfg.trainer.optim == Optim(lr=0.25)
    assert cfg.trainer.n_critic == 5
    assert cfg.model == Model()


def test_round_trip_through_dict_and_yaml(tmp_path) -> None:
    cfg = _custom()
    plain = to_dict(cfg)
    assert plain["trainer"]["hidden"] == [128, 32, 8]
    assert plain["model"]["shape"] == [16, "gelu"]
    assert plain["trainer"]["grad_clip"] is None
    assert from_dict(Root, plain) == cfg

    path = tmp_path / "out" / "config.yaml"
    dump_yaml(cfg, path, header="written by a test\nsecond line")
    text = path.read_text()
    assert text.startswith("# written by a test\n# second line\n")
    assert "hidden: [128, 32, 8]" in text
    assert from_dict(Root, load_yaml_file(path)) == cfg
    assert from_dict(Root, yaml.safe_load(text)) == cfg  # plain safe_load reads it too


def test_built_tree_is_frozen_and_typed() -> None:
    cfg = from_dict(Root, {"trainer": {"lr": 1, "hidden": [1, 2]}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.trainer.lr = 2.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]
    assert cfg.trainer.lr == 1.0 and type(cfg.trainer.lr) is float  # int accepted for float
    assert cfg.trainer.hidden == (1, 2) and isinstance(cfg.trainer.hidden, tuple)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1e-3", 1e-3),
        ("2.5E4", 2.5e4),
        ("-1e3", -1000.0),
        ("1_000.5", 1000.5),
        ("inf", float("inf")),
    ],
)
def test_float_field_accepts_numeric_strings(text: str, expected: float) -> None:
    # PyYAML reads ``lr: 1e-3`` as the string '1e-3' (YAML 1.1); float fields accept it.
    cfg = from_dict(Root, {"trainer": {"lr": text, "optim": {"betas": [text]}}})
    assert cfg.trainer.lr == expected and type(cfg.trainer.lr) is float
    assert cfg.trainer.optim.betas == (expected,)


def test_from_dict_does_not_call_validate() -> None:
    assert from_dict(Trainer, {"n_critic": 1}).n_critic == 1


def test_from_dict_accepts_built_sections() -> None:
    optim = Optim(lr=0.1)
    assert from_dict(Trainer, {"optim": optim}).optim is optim


# --------------------------------------------------------------------------- build errors


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        (
            {"trainer": {"n_critc": 3}},
            [
                "unknown key 'trainer.n_critc'",
                "valid keys under 'trainer': n_critic, lr, use_ema, max_steps",
                "did you mean 'n_critic'?",
            ],
        ),
        (
            {"sede": 1},
            [
                "unknown key 'sede'",
                "valid top-level keys: seed, name, trainer, model",
                "did you mean 'seed'?",
            ],
        ),
        # a key at the wrong level points at where it lives
        ({"n_critic": 1}, ["unknown key 'n_critic'", "did you mean 'trainer.n_critic'?"]),
        (
            {"trainer": {"optim": {"betaz": [0.9]}}},
            [
                "unknown key 'trainer.optim.betaz'",
                "valid keys under 'trainer.optim': lr, betas",
                "did you mean 'betas'?",
            ],
        ),
        ({"trainer": {"lr": "abc"}}, ["'trainer.lr' must be a float, got 'abc' (str)"]),
        ({"trainer": {"lr": True}}, ["'trainer.lr' must be a float, got True (bool)"]),
        ({"seed": True}, ["'seed' must be an int, got True (bool)"]),
        ({"seed": "3"}, ["'seed' must be an int, got '3' (str)"]),
        ({"seed": 3.0}, ["'seed' must be an int, got 3.0 (float)", "write 3"]),
        (
            {"trainer": {"use_ema": "yes"}},
            ["'trainer.use_ema' must be a bool (true or false)", "got 'yes' (str)"],
        ),
        ({"trainer": {"use_ema": 1}}, ["'trainer.use_ema' must be a bool", "got 1 (int)"]),
        ({"name": 123}, ["'name' must be a string, got 123 (int)", "quote it"]),
        (
            {"model": {"kind": "mpl"}},
            ["'model.kind' must be one of 'mlp', 'unet', got 'mpl' (str)", "did you mean 'mlp'?"],
        ),
        (
            {"trainer": {"optim": {"schedule": "linear"}}},
            ["'trainer.optim.schedule' must be one of 'constant', 'cosine', got 'linear'"],
        ),
        (
            {"trainer": {"device": "cdua"}},
            [
                "'trainer.device' must be one of 'cpu', 'cuda', got 'cdua' (str)",
                "did you mean 'cuda'?",
            ],
        ),
        (
            {"trainer": {"max_steps": "ten"}},
            ["'trainer.max_steps' must be an int or null, got 'ten' (str)"],
        ),
        (
            {"trainer": {"grad_clip": [1.0]}},
            ["'trainer.grad_clip' must be a float or null, got [1.0] (list)"],
        ),
        ({"trainer": {"hidden": 64}}, ["'trainer.hidden' must be a list of int, got 64 (int)"]),
        (
            {"trainer": {"hidden": [64, "wide"]}},
            ["'trainer.hidden[1]' must be an int, got 'wide' (str)"],
        ),
        ({"trainer": {"tags": ["ok", 5]}}, ["'trainer.tags[1]' must be a string, got 5 (int)"]),
        (
            {"model": {"shape": [8]}},
            ["'model.shape' must be a list of 2 items (int, str), got [8] (list)", "1 items"],
        ),
        ({"model": {"shape": ["8", "relu"]}}, ["'model.shape[0]' must be an int, got '8'"]),
        ({"trainer": 5}, ["'trainer' must be a mapping", "n_critic, lr", "got 5 (int)"]),
        (
            {"trainer": {"optim": [1, 2]}},
            [
                "'trainer.optim' must be a mapping (a section with keys lr, betas, schedule)",
                "got [1, 2] (list)",
            ],
        ),
        ({"seed": None}, ["'seed' must be an int, got null"]),
    ],
)
def test_from_dict_errors_name_key_value_and_valid_options(
    data: dict, fragments: list[str]
) -> None:
    message = _error(Root, data)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_unknown_key_without_close_match_has_no_suggestion() -> None:
    message = _error(Root, {"trainer": {"zzzzzzzz": 1}})
    assert "unknown key 'trainer.zzzzzzzz'" in message
    assert "did you mean" not in message


def test_non_mapping_top_level_and_where_prefix() -> None:
    assert "the config must be a mapping" in _error(Root, [1, 2])
    assert "got [1, 2] (list)" in _error(Root, [1, 2])
    message = _error(Trainer, {"lr": "x"}, where="trainer")
    assert message.startswith("'trainer.lr' must be a float")
    assert "'section' must be a mapping" in _error(Trainer, 3, where="section")


def test_config_error_is_value_error_with_key() -> None:
    with pytest.raises(ValueError) as info:
        from_dict(Root, {"trainer": {"optim": {"lr": "fast"}}})
    assert isinstance(info.value, ConfigError)
    assert info.value.key == "trainer.optim.lr"
    assert (
        info.value.with_context("config file 'a.yaml'")
        .args[0]
        .startswith("config file 'a.yaml': 'trainer.optim.lr' must be a float")
    )


def test_long_values_are_shortened_in_messages() -> None:
    message = _error(Root, {"name": list(range(1000))})
    assert "..." in message and len(message) < 300


# --------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    ("text", "path", "value"),
    [
        ("seed=3", ["seed"], 3),
        ("trainer.optim.lr=1e-3", ["trainer", "optim", "lr"], 1e-3),
        ("trainer.use_ema=false", ["trainer", "use_ema"], False),
        ("trainer.hidden=[1,2]", ["trainer", "hidden"], [1, 2]),
        ("trainer.max_steps=null", ["trainer", "max_steps"], None),
        ("trainer.max_steps=", ["trainer", "max_steps"], None),
        ("name='42'", ["name"], "42"),
        ("name=a=b", ["name"], "a=b"),
        (" trainer . lr =0.5", ["trainer", "lr"], 0.5),
    ],
)
def test_parse_override(text: str, path: list[str], value: object) -> None:
    got_path, got_value = parse_override(text)
    assert got_path == path
    assert got_value == value and type(got_value) is type(value)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("trainer.lr", ["malformed override 'trainer.lr'", "no '='", "key.sub=value"]),
        ("=3", ["malformed override '=3'", "empty key", "key.sub=value"]),
        ("trainer..lr=3", ["empty part in key 'trainer..lr'", "key.sub=value"]),
        (
            "trainer.hidden=[1, 2",
            ["malformed override 'trainer.hidden=[1, 2'", "is not valid YAML"],
        ),
    ],
)
def test_parse_override_errors(text: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_override(text)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_apply_overrides_builds_expected_tree() -> None:
    data = {"seed": 1, "trainer": {"n_critic": 2, "grad_clip": 0.5}}
    merged = apply_overrides(
        data,
        [
            "trainer.optim.lr=1e-3",
            "trainer.use_ema=false",
            "trainer.hidden=[1,2]",
            "trainer.grad_clip=null",
            "model.kind=unet",
            "seed=5",
            "seed=6",  # the last one wins
        ],
        Root,
    )
    assert data == {"seed": 1, "trainer": {"n_critic": 2, "grad_clip": 0.5}}  # untouched
    cfg = from_dict(Root, merged)
    assert cfg.seed == 6
    assert cfg.trainer.n_critic == 2  # from data
    assert cfg.trainer.optim.lr == 1e-3 and type(cfg.trainer.optim.lr) is float
    assert cfg.trainer.use_ema is False
    assert cfg.trainer.hidden == (1, 2)
    assert cfg.trainer.grad_clip is None
    assert cfg.model.kind == "unet"


def test_apply_overrides_with_plain_safe_load_string_float() -> None:
    # Data from plain yaml.safe_load keeps '1e-3' a str; the float field still accepts it.
    merged = apply_overrides(yaml.safe_load("trainer: {lr: 1e-3}"), [], Root)
    assert merged == {"trainer": {"lr": "1e-3"}}
    assert from_dict(Root, merged).trainer.lr == 1e-3


def test_apply_overrides_merges_mapping_into_section() -> None:
    merged = apply_overrides(
        {"trainer": {"n_critic": 2, "optim": {"lr": 0.1}}},
        ["trainer={optim: {schedule: cosine}}"],
        Root,
    )
    assert merged == {"trainer": {"n_critic": 2, "optim": {"lr": 0.1, "schedule": "cosine"}}}


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        (
            "trainer.n_critc=5",
            [
                "override 'trainer.n_critc=5'",
                "unknown key 'trainer.n_critc'",
                "valid keys under 'trainer'",
                "did you mean 'n_critic'?",
            ],
        ),
        (
            "traner.lr=1",
            ["unknown key 'traner'", "valid top-level keys", "did you mean 'trainer'?"],
        ),
        ("trainer.optim.lrr=1", ["unknown key 'trainer.optim.lrr'", "did you mean 'lr'?"]),
        (
            "trainer.lr.value=1",
            ["'trainer.lr' is a float setting, not a section", "'trainer.lr.value' does not exist"],
        ),
    ],
)
def test_apply_overrides_rejects_unknown_keys(override: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides({}, [override], Root)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_apply_overrides_into_non_mapping_section() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides({"trainer": 3}, ["trainer.lr=1"], Root)
    assert "'trainer' is not a mapping, got 3 (int)" in str(info.value)


# --------------------------------------------------------------------------- YAML files


def test_load_yaml_file_reads_mapping_and_exponent_floats(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("seed: 2\ntrainer:\n  lr: 1e-3\n  hidden: [4, 4]\n")
    data = load_yaml_file(path)
    assert data == {"seed": 2, "trainer": {"lr": 1e-3, "hidden": [4, 4]}}
    assert type(data["trainer"]["lr"]) is float


def test_load_yaml_file_empty_and_comment_only(tmp_path) -> None:
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "comments.yaml").write_text("# nothing here\n")
    assert load_yaml_file(tmp_path / "empty.yaml") == {}
    assert load_yaml_file(str(tmp_path / "comments.yaml")) == {}


def test_load_yaml_file_missing(tmp_path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_yaml_file(path)
    assert str(info.value) == f"config file '{path}' not found"


def test_load_yaml_file_syntax_error_names_line_and_column(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("seed: 1\ntrainer:\n  lr: 0.1\n  hidden: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        load_yaml_file(path)
    message = str(info.value)
    assert message.startswith(f"invalid YAML in config file '{path}' at line ")
    assert "\n" not in message
    line = int(message.split(" at line ")[1].split(",")[0])
    assert line in (4, 5)  # the unclosed list starts on 4; the parser notices at EOF
    assert ", column " in message

    path.write_text("seed: 1\nname: a: b\n")
    with pytest.raises(ConfigError) as info:
        load_yaml_file(path)
    assert "at line 2, column 8: mapping values are not allowed here" in str(info.value)


def test_load_yaml_file_duplicate_key(tmp_path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("trainer:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError) as info:
        load_yaml_file(path)
    assert "at line 3, column 3: duplicate key 'lr'" in str(info.value)


def test_load_yaml_file_allows_merge_keys(tmp_path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text("base: &b {lr: 0.1, n: 1}\ntrainer:\n  <<: *b\n  lr: 0.2\n")
    assert load_yaml_file(path)["trainer"] == {"lr": 0.2, "n": 1}


@pytest.mark.parametrize(
    ("text", "got"), [("- 1\n- 2\n", "got [1, 2] (list)"), ("just text\n", "got 'just text' (str)")]
)
def test_load_yaml_file_non_mapping_top_level(tmp_path, text: str, got: str) -> None:
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_yaml_file(path)
    assert f"config file '{path}' must hold a mapping of keys at the top level" in str(info.value)
    assert got in str(info.value)


def test_load_config_attributes_errors_to_file_or_override(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\ntrainer:\n  lr: 1e-3\n  n_critic: many\n")
    with pytest.raises(ConfigError) as info:
        load_config(Root, path)
    assert str(info.value).startswith(f"config file '{path}': 'trainer.n_critic' must be an int")

    # the override fixes the file's bad value and introduces its own
    with pytest.raises(ConfigError) as info:
        load_config(Root, path, ["trainer.n_critic=2", "trainer.optim={lr: fast}"])
    assert str(info.value).startswith(
        "override 'trainer.optim={lr: fast}': 'trainer.optim.lr' must be a float, got 'fast'"
    )

    cfg = load_config(Root, path, ["trainer.n_critic=2", "trainer.hidden=[3]"])
    assert cfg.trainer == Trainer(lr=1e-3, n_critic=2, hidden=(3,))
    assert load_config(Root, None, ["seed=9"]) == Root(seed=9)


# --------------------------------------------------------------------------- dumping


def test_dump_yaml_is_atomic(tmp_path, monkeypatch) -> None:
    path = tmp_path / "config.yaml"
    dump_yaml(Root(), path)
    dump_yaml(_custom(), path)  # overwrites
    assert from_dict(Root, load_yaml_file(path)) == _custom()
    assert sorted(os.listdir(tmp_path)) == ["config.yaml"]  # no temp files left

    before = path.read_text()

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk on fire"):
        dump_yaml(Root(), path)
    assert path.read_text() == before  # the old file is intact
    assert sorted(os.listdir(tmp_path)) == ["config.yaml"]  # and the temp file is gone


def test_to_dict_output_is_plain() -> None:
    assert to_dict(Root()) == {
        "seed": 0,
        "name": "run",
        "trainer": {
            "n_critic": 5,
            "lr": 3e-4,
            "use_ema": True,
            "max_steps": None,
            "grad_clip": 1.0,
            "hidden": [64, 64],
            "tags": [],
            "device": "cpu",
            "optim": {"lr": 1e-3, "betas": [0.9, 0.999], "schedule": "constant"},
        },
        "model": {"kind": "mlp", "shape": [8, "relu"]},
    }
    with pytest.raises(TypeError):
        to_dict(Root)


# --------------------------------------------------------------------------- reference docs

_EXPECTED_FIELDS = [
    FieldInfo("seed", "int", "0", "Random seed."),
    FieldInfo("name", "str", "'run'", "Run name."),
    FieldInfo("trainer.n_critic", "int", "5", "Critic steps per generator step."),
    FieldInfo("trainer.lr", "float", "0.0003", "Policy learning rate."),
    FieldInfo("trainer.use_ema", "bool", "true", "Keep an EMA copy of the weights."),
    FieldInfo(
        "trainer.max_steps", "int | None", "null", "Stop after this many steps (null: never)."
    ),
    FieldInfo(
        "trainer.grad_clip", "float | None", "1.0", "Clip gradient norm (null: no clipping)."
    ),
    FieldInfo("trainer.hidden", "tuple[int, ...]", "[64, 64]", "Hidden layer widths."),
    FieldInfo("trainer.tags", "tuple[str, ...]", "[]", "Free-form run tags."),
    FieldInfo("trainer.device", "'cpu' | 'cuda'", "'cpu'", "Where to train."),
    FieldInfo("trainer.optim.lr", "float", "0.001", "Learning rate."),
    FieldInfo("trainer.optim.betas", "tuple[float, ...]", "[0.9, 0.999]", "Adam betas."),
    FieldInfo(
        "trainer.optim.schedule", "'constant' | 'cosine'", "'constant'", "Learning-rate schedule."
    ),
    FieldInfo("model.kind", "'mlp' | 'unet'", "'mlp'", "Network architecture."),
    FieldInfo("model.shape", "tuple[int, str]", "[8, 'relu']", "Width and activation."),
]


def test_iter_fields_lists_every_leaf() -> None:
    assert list(iter_fields(Root)) == _EXPECTED_FIELDS
    assert [f.name for f in iter_fields(Optim, "x")] == ["x.lr", "x.betas", "x.schedule"]


def test_type_string() -> None:
    assert type_string(Optional[int]) == "int | None"  # noqa: UP045
    assert type_string(Literal["a", "b"] | None) == "'a' | 'b' | None"
    assert type_string(tuple[float, ...]) == "tuple[float, ...]"
    assert type_string(Optim) == "Optim"


def test_config_reference_markdown_has_every_key() -> None:
    markdown = config_reference_markdown(Root)
    for info in _EXPECTED_FIELDS:
        assert f"| `{info.name}` |" in markdown
    assert markdown.count("| key | type | default | description |") == 4  # 4 sections
    assert "### Top level" in markdown
    assert "### `trainer.optim`\n\nOptimizer settings.\n" in markdown
    # pipes inside the type are escaped so the table keeps four columns
    assert "| `model.kind` | `'mlp' \\| 'unet'` | `'mlp'` | Network architecture. |" in markdown
    for line in markdown.splitlines():
        if line.startswith("| `"):
            assert line.replace("\\|", "").count("|") == 5, line


# --------------------------------------------------------------------------- schema checks


def test_check_schema_accepts_sample_and_reports_every_problem() -> None:
    check_schema(Root)
    with pytest.raises(TypeError) as info:
        check_schema(_BadRoot)
    message = str(info.value)
    assert "leaf.widths: unsupported type list[int]; use tuple[X, ...]" in message
    assert "leaf.undocumented: no doc" in message
    assert "leaf.wrong_default: default does not fit" in message
    assert "leaf.bad_choice: default does not fit" in message
    assert "loose: _NotFrozen is not frozen" in message


def test_doc_field_rejects_misuse() -> None:
    with pytest.raises(TypeError, match="non-empty"):
        doc_field(1, "")
    with pytest.raises(TypeError, match="not both"):
        doc_field(1, "doc", default_factory=Optim)
    field = doc_field(1, "  Two\n  lines. ", choices=["a"])
    assert field.metadata["doc"] == "Two lines."
    assert field.metadata["choices"] == ("a",)


@dataclass(frozen=True)
class _WithOptionalSection:
    extra: Optim | None = doc_field(None, "Optional optimizer section (null: off).")


def test_optional_section() -> None:
    assert from_dict(_WithOptionalSection, {}).extra is None
    assert from_dict(_WithOptionalSection, {"extra": None}).extra is None
    assert from_dict(_WithOptionalSection, {"extra": {"lr": 0.2}}).extra == Optim(lr=0.2)
    message = _error(_WithOptionalSection, {"extra": 3})
    assert "'extra' must be a mapping (a section with keys lr, betas, schedule) or null" in message
    merged = apply_overrides({"extra": None}, ["extra.lr=0.1"], _WithOptionalSection)
    assert from_dict(_WithOptionalSection, merged).extra == Optim(lr=0.1)
    assert [(f.name, f.type, f.default) for f in iter_fields(_WithOptionalSection)][:2] == [
        ("extra", "Optim | None", "null"),
        ("extra.lr", "float", "0.001"),
    ]
    check_schema(_WithOptionalSection)


def test_readme_config_reference_matches_the_dataclasses():
    """The README's config reference is generated from the field docs and must not drift."""
    from pathlib import Path

    from sftrl.config import Config
    from sftrl.configtools import iter_fields
    from sftrl.docs import with_reference

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert with_reference(readme) == readme, "run: python -m sftrl.docs"
    for field in iter_fields(Config):
        assert f"`{field.name}`" in readme.split("## Config reference", 1)[1], field.name


# --------------------------------------------------------------------------- ranges


@dataclass(frozen=True)
class Ranged:
    width: int = doc_field(64, "A width.", valid=Range(1, 1024))
    rate: float = doc_field(0.1, "A rate.", valid=Range(0.0, low_open=True))
    decay: float = doc_field(0.0, "A decay.", valid=Range(0.0, 1.0, high_open=True, note="(0: none)"))
    cap: int | None = doc_field(None, "A cap.", valid=Range(1))
    sizes: tuple[int, ...] = doc_field((8, 8), "Sizes.", valid=Range(1, 64, items="1+"))
    pair: tuple[int, ...] = doc_field((1, 2), "Two.", valid=Range(0, items=2))
    free: float = doc_field(0.5, "Any finite number.")


@dataclass(frozen=True)
class _OutOfRange:
    width: int = doc_field(0, "A width.", valid=Range(1))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("width=0", "'width' = 0 is invalid: must be between 1 and 1024"),
        ("rate=0", "'rate' = 0.0 is invalid: must be > 0"),
        ("decay=1", "'decay' = 1.0 is invalid: must be in [0, 1) (0: none)"),
        ("cap=0", "'cap' = 0 is invalid: must be >= 1"),
        ("sizes=[]", "'sizes' = [] is invalid: must hold one or more item(s)"),
        ("sizes=[8,65]", "'sizes[1]' = 65 is invalid: must be between 1 and 64"),
        ("pair=[1]", "'pair' = [1] is invalid: must hold 2 item(s)"),
        ("free=.inf", "'free' = inf is invalid: must be a finite number"),
    ],
)
def test_check_ranges_names_the_key_the_value_and_the_range(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(Ranged, None, [override], check=check_ranges)
    assert str(info.value) == f"override '{override}': {message}"
    assert info.value.key == message.split("'")[1]


def test_ranges_pass_in_range_and_null_and_show_in_the_reference() -> None:
    check_ranges(load_config(Ranged, None, ["cap=null", "decay=0", "sizes=[1,64]"]))
    docs = {f.name: f.doc for f in iter_fields(Ranged)}
    assert docs["rate"] == "A rate. Valid: > 0."
    assert docs["sizes"] == "Sizes. Valid: one or more item(s), each between 1 and 64."
    assert docs["free"] == "Any finite number."
    with pytest.raises(TypeError, match=r"width: default 0 is outside its valid range \(>= 1\)"):
        check_schema(_OutOfRange)
