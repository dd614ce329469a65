import pytest
import yaml

from attnmaps.config import (
    Config,
    ModelConfig,
    apply_overrides,
    config_to_dict,
    describe_keys,
    load_config,
    save_config,
)


def test_defaults_without_file_or_overrides():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.model.img_size == [64, 64]
    assert cfg.train.betas == [0.9, 0.95]
    assert cfg.model.init_from is None
    # list defaults are not shared between instances
    assert ModelConfig().img_size is not ModelConfig().img_size


@pytest.mark.parametrize(
    ("override", "getter", "expected"),
    [
        ("train.lr=3e-4", lambda c: c.train.lr, 3e-4),
        ("train.lr=1", lambda c: c.train.lr, 1.0),
        ("train.epochs=7", lambda c: c.train.epochs, 7),
        ("model.img_size=[96,96]", lambda c: c.model.img_size, [96, 96]),
        ("model.img_size=96,80", lambda c: c.model.img_size, [96, 80]),
        ("train.betas=0.8, 0.99", lambda c: c.train.betas, [0.8, 0.99]),
        ("model.init_from=null", lambda c: c.model.init_from, None),
        ("model.init_from=runs/a/last.safetensors", lambda c: c.model.init_from,
         "runs/a/last.safetensors"),
        ("model.gates=false", lambda c: c.model.gates, False),
        ("pseudo.use_true_labels=true", lambda c: c.pseudo.use_true_labels, True),
        ("train.grad_clip=null", lambda c: c.train.grad_clip, None),
        ("data.image_size=32,48", lambda c: c.data.image_size, [32, 48]),
        ("data.train_split=2012", lambda c: c.data.train_split, "2012"),
        ("model.attn_blocks=last3", lambda c: c.model.attn_blocks, "last3"),
        ("model.attn_blocks=all", lambda c: c.model.attn_blocks, "all"),
        ("out_dir=runs/x=1", lambda c: c.out_dir, "runs/x=1"),
        ("train={lr: 0.5, epochs: 2}", lambda c: (c.train.lr, c.train.epochs), (0.5, 2)),
    ],
)
def test_override_parsing(override, getter, expected):
    value = getter(load_config(None, [override]))
    assert value == expected
    assert type(value) is type(expected)


def test_apply_overrides_returns_copy_and_last_wins():
    cfg = Config()
    new = apply_overrides(cfg, ["train.lr=0.1", "train.lr=0.2", "model.img_size=8,8"])
    assert new.train.lr == 0.2
    assert cfg.train.lr == 1e-3 and cfg.model.img_size == [64, 64]


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("train.lrr=1", (r"'train\.lrr'.*Did you mean 'train\.lr'\?.*section 'train': epochs, "
                        r"batch_size, lr, min_lr")),
        ("foo.x=1", (r"Unknown config key 'foo'\. Valid keys in the top level: model, data, "
                    r"train, pseudo, segment, pretrain, out_dir")),
        ("modl.depth=2", r"Unknown config key 'modl'\. Did you mean 'model'\?"),
        ("train.lr.x=1", r"'train\.lr' is not a section, so 'train\.lr\.x' does not exist"),
        ("model=3", r"'model' is a section; expected a mapping, got 3"),
        ("train.epochs=1.5", r"'train\.epochs': got 1\.5 \(float\), expected int"),
        ("train.epochs=true", r"'train\.epochs': got True \(bool\), expected int"),
        ("model.gates=1", r"'model\.gates': got 1 \(int\), expected bool"),
        ("train.lr=abc", r"'train\.lr': got 'abc' \(str\), expected float"),
        ("train.grad_clip=[1]", r"'train\.grad_clip': got \[1\] \(list\), expected float \| None"),
        ("model.img_size=[a,b]", (r"'model\.img_size': got \['a', 'b'\] \(list\), "
                                 r"expected list\[int\]")),
        ("model.img_size=96", r"'model\.img_size': got 96 \(int\), expected list\[int\]"),
        ("model.img_size=[1,2,3]", r"'model\.img_size': got \[1, 2, 3\], expected a list of 2"),
        ("out_dir=null", r"'out_dir': got None \(NoneType\), expected str"),
        ("model.head=foo", r"'model\.head': got 'foo', expected one of 'joint', 'per_token'"),
        ("model.stem=patch", r"'model\.stem': got 'patch', expected one of 'conv', 'linear'"),
        ("model.attn_blocks=last0", (r"'model\.attn_blocks': got 'last0', expected 'last', "
                                    r"'last<n>' \(n >= 1\) or 'all'")),
        ("model.attn_blocks=first", r"'model\.attn_blocks': got 'first'"),
        ("data.mean=[0.5,0.5]", r"'data\.mean' has 2 values .*model\.in_chans=3"),
        ("model.img_size=[1,2", r"Override 'model\.img_size=\[1,2': value is not valid YAML"),
        ("trainlr", r"Malformed override 'trainlr': expected 'key=value'"),
        ("train={lrr: 1}", r"Unknown config key 'train\.lrr'"),
    ],
)
def test_override_errors(override, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_config(None, [override])


def test_overrides_given_as_one_string():
    with pytest.raises(TypeError, match="overrides must be a list of 'key=value' strings"):
        load_config(None, "train.lr=1")


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "model:\n  depth: 2\n  img_size: [32, 32]\ntrain:\n  lr: 1e-3\n  epochs: 3\n"
        "out_dir: runs/yaml\n"
    )
    cfg = load_config(path, ["train.epochs=5"])
    assert cfg.model.depth == 2 and cfg.model.img_size == [32, 32]
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)  # YAML 1.1 reads "1e-3" as str
    assert cfg.train.epochs == 5
    assert cfg.out_dir == "runs/yaml"
    assert cfg.model.embed_dim == 128  # untouched default


def test_empty_yaml_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == Config()


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("train:\n  lrr: 1\n", r"cfg\.yaml: Unknown config key 'train\.lrr'.*Did you mean"),
        ("bogus:\n  x: 1\n", r"cfg\.yaml: Unknown config key 'bogus'"),
        ("model:\n  depth: deep\n", r"cfg\.yaml: Config key 'model\.depth': got 'deep'"),
        ("train: 3\n", r"cfg\.yaml: Config key 'train' is a section; expected a mapping"),
        ("- 1\n- 2\n", r"cfg\.yaml must hold a YAML mapping"),
        ("model: [1\n", r"cfg\.yaml is not valid YAML"),
    ],
)
def test_yaml_file_errors(tmp_path, text, pattern):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=pattern):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_save_load_round_trip(tmp_path):
    cfg = load_config(
        None,
        ["model.img_size=96,80", "model.init_from=w.safetensors", "train.lr=3e-4",
         "train.grad_clip=null", "data.image_size=[40,40]", "model.attn_blocks=last2"],
    )
    path = tmp_path / "sub" / "config.yaml"
    save_config(cfg, path)
    assert yaml.safe_load(path.read_text()) == config_to_dict(cfg)
    assert load_config(path) == cfg
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]


def test_config_to_dict_is_plain_nested_dict():
    d = config_to_dict(Config())
    assert d["model"]["img_size"] == [64, 64]
    assert d["train"]["grad_clip"] == 1.0
    assert set(d) == {"model", "data", "train", "pseudo", "segment", "pretrain", "out_dir"}
    d["model"]["img_size"].append(1)
    assert Config().model.img_size == [64, 64]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("segment.ignore_margin=1.5", r"'segment\.ignore_margin' is 1\.5; expected a score margin"),
        ("segment.epochs=0", r"'segment\.epochs' is 0; expected at least 1"),
        ("segment.arch=vit", r"'segment\.arch': got 'vit', expected one of 'vit_mlp', 'smp'"),
        ("segment.window=[16,16]", r"'segment\.overlap' is 16; expected fewer pixels"),
        ("segment.max_images=-1", r"'segment\.max_images' is -1"),
    ],
)
def test_segment_section_errors(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_help_lists_every_config_key_with_its_default(capsys) -> None:
    import dataclasses

    from attnmaps.cli import main
    from attnmaps.config import TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for key in dataclasses.fields(TrainConfig):
        assert f"train.{key.name} = {getattr(TrainConfig(), key.name)!r}" in text
    assert "model.patch_head = False" in text and "segment." not in text
    sections = [getattr(Config(), s.name) for s in dataclasses.fields(Config)]
    assert len(describe_keys().splitlines()) == sum(
        len(dataclasses.fields(s)) if dataclasses.is_dataclass(s) else 1 for s in sections)
    assert "  out_dir = " in describe_keys()
