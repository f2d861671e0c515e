from pathlib import Path

import pytest

from megapairs_ray.config import ConfigError, config_from_dict, load_config, parse_overrides
from tests.helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("profile", ["tiny", "paper", "paper-tiny"])
def test_profiles_load(profile):
    cfg = load_config(ROOT / "configs" / f"{profile}.yaml")
    assert cfg.profile == profile
    assert cfg.embed.max_actors >= cfg.embed.min_actors


def test_paper_profile_names_the_papers_models_and_asks_for_gpus():
    cfg = load_config(ROOT / "configs" / "paper.yaml")
    assert cfg.embed.space_names == ["clip_image", "dino_image", "clip_text"]
    assert cfg.embed.space("clip_image").encoder.model.startswith("EVA02")
    assert cfg.embed.space("clip_text").encoder.kind == "open_clip_text"
    assert "dinov2" in cfg.embed.space("dino_image").encoder.model
    assert cfg.mine.spaces == cfg.embed.space_names  # every space is mined, in that order
    assert cfg.embed.device == "cuda" and cfg.embed.num_gpus >= 1
    assert cfg.embed.decode == "gpu" and cfg.embed.precision == "bf16"


def test_profiles_name_the_paper_s_synthesis_models():
    paper = load_config(ROOT / "configs" / "paper.yaml")
    assert paper.describe.model == "OpenGVLab/InternVL2-26B"
    assert paper.instruct.model == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert paper.export.image_size == 512 and paper.describe.engine_num_gpus >= 1
    tiny = load_config(ROOT / "configs" / "tiny.yaml")
    assert tiny.describe.model == "tiny-random-llava" and tiny.instruct.model == "tiny-random-llama"
    assert tiny.describe.engine_num_gpus == tiny.instruct.engine_num_gpus == 0


# Where configs/paper-tiny.yaml may differ from configs/paper.yaml (its header says why); a name
# ending in "." covers every field under it.
PAPER_TINY_DIFFERS = {
    "profile", "run_dir", "input.uris", "ingest.num_cpus",
    "embed.spaces.clip_image.encoder.", "embed.spaces.dino_image.encoder.",
    "embed.spaces.clip_text.encoder.", "embed.device", "embed.precision", "embed.decode",
    "embed.batch_size", "embed.decode_threads", "embed.max_actors", "embed.num_gpus",
    "embed.num_cpus", "embed.reader_num_cpus", "embed.writer_num_cpus", "embed.writer_batch_rows",
    "index.kind", "index.shards", "index.shard_num_cpus",
    "mine.k", "mine.query_fraction", "mine.actors", "mine.num_cpus",
    "ray.address", "ray.num_cpus", "ray.object_store_memory",
    "describe.model", "instruct.model", "describe.tiny_model_dir", "instruct.tiny_model_dir",
    "describe.engine_kwargs.enforce_eager", "instruct.engine_kwargs.enforce_eager",
    "describe.env_vars.", "instruct.env_vars.", "describe.tensor_parallel_size",
    "describe.replicas", "instruct.replicas", "describe.engine_num_gpus",
    "instruct.engine_num_gpus", "describe.engine_num_cpus", "instruct.engine_num_cpus",
    "describe.fetch_actors", "describe.sampling_seed", "instruct.sampling_seed",
    "export.num_cpus",
}


def _leaves(value, prefix=""):
    """Every field as ``{"dotted.name": value}``; a list of named sections (embed.spaces) by
    name, and the names in their order under the list's own name."""
    if isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v
                                                 for v in value):
        value = {"": [v["name"] for v in value], **{v["name"]: v for v in value}}
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_leaves(v, f"{prefix}{k}." if k else prefix))
        return out
    return {prefix.rstrip("."): value}


def _allowed(field):
    return field in PAPER_TINY_DIFFERS or any(
        a.endswith(".") and field.startswith(a) for a in PAPER_TINY_DIFFERS)


def test_paper_tiny_is_the_paper_profile_but_for_its_listed_differences():
    paper = _leaves(load_config(ROOT / "configs" / "paper.yaml").model_dump(mode="json"))
    tiny = _leaves(load_config(ROOT / "configs" / "paper-tiny.yaml").model_dump(mode="json"))
    differ = {f for f in paper.keys() | tiny.keys() if paper.get(f, "?") != tiny.get(f, "?")}
    assert sorted(f for f in differ if not _allowed(f)) == []
    # Every listed difference is one (a stale entry would hide a change from review).
    assert sorted(a for a in PAPER_TINY_DIFFERS if not any(
        f == a or (a.endswith(".") and f.startswith(a)) for f in differ)) == []
    assert tiny["describe.model"] == "tiny-random-internvl2"
    assert tiny["instruct.model"] == "tiny-random-llama3"
    # The header names each difference (a field or a section above it).
    text = (ROOT / "configs" / "paper-tiny.yaml").read_text()
    header = " ".join(line for line in text.splitlines() if line.startswith("#"))
    for field in differ:
        parts = field.split(".")
        assert any(".".join(parts[:i]) + suffix in header
                   for i in range(min(2, len(parts)), len(parts) + 1)
                   for suffix in (",", " ", ".*")), field


def test_overrides_are_applied_and_validated():
    cfg = load_config(ROOT / "configs" / "tiny.yaml",
                      ["embed.batch_size=7", "run_dir=/tmp/x/", "input.uris=[a, b]"])
    assert cfg.embed.batch_size == 7
    assert cfg.run_dir == "/tmp/x"
    assert cfg.input.uris == ["a", "b"]
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize(("change", "field"), [
    ({"embed": {"batch_size": 0}}, "embed.batch_size"),
    ({"embed": {"batchsize": 8}}, "embed.batchsize"),  # a typo is an error, not a default
    ({"ingest": {"unusual_modes": "maybe"}}, "ingest.unusual_modes"),
    ({"embed": {"min_actors": 4, "max_actors": 2}}, "embed.min_actors"),
    ({"embed": {"device": "cuda", "num_gpus": 0}}, "embed.num_gpus"),
    ({"embed": {"decode": "gpu"}}, "embed.decode"),
    ({"input": {"uris": []}}, "input.uris"),
    ({"describe": {"image_size": 4}}, "describe.image_size"),
    ({"describe": {"tempreature": 0.5}}, "describe.tempreature"),
    ({"instruct": {"max_instructions": 2}}, "instruct.max_instructions"),
    ({"export": {"jpeg_quality": 101}}, "export.jpeg_quality"),
    ({"mine": {"windows": {"clip_imag": [0.5, 0.9]}}}, "clip_imag"),  # a misspelt space
    ({"mine": {"windows": {"clip_imag": [0.5, 0.9]}}}, "mine.windows"),
    ({"mine": {"spaces": ["clip_image", "caption"]}}, "mine.spaces"),
    ({"embed": {"spaces": []}}, "embed.spaces"),
    ({"index": {"kind": "ivf_pq", "pq_refine": False}}, "index.pq_refine"),  # approximate scores
])
def test_bad_fields_are_named(tmp_path, change, field):
    doc = tiny_config(tmp_path, ["x"])
    for section, values in change.items():
        doc[section] = {**doc.get(section, {}), **values}
    with pytest.raises(ConfigError) as err:
        config_from_dict(doc)
    assert field in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"section\.field=value"):
        parse_overrides(["no-equals-sign"])


@pytest.mark.parametrize("name", ["train-tiny.yaml", "train-paper.yaml", "align-demo.yaml",
                                  "train-demo.yaml"])
def test_training_profiles_load(name):
    from megapairs_ray.train.config import TrainConfig

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / name, schema=TrainConfig)
    assert cfg.optim.max_steps > cfg.optim.warmup_steps
    assert cfg.scaling.use_gpu == (name == "train-paper.yaml")


def test_the_probe_profile_loads_and_names_loadable_train_configs():
    from megapairs_ray.train.config import TrainConfig
    from megapairs_ray.train.probe import ProbeConfig

    repo = Path(__file__).resolve().parents[1]
    probe = load_config(repo / "configs" / "probe-demo.yaml", schema=ProbeConfig)
    align = load_config(repo / probe.align, schema=TrainConfig)
    assert align.model.family == "towers" and align.data.captions_from == probe.run_dir
    assert load_config(repo / probe.train, schema=TrainConfig).model.freeze_image_tower


def test_a_training_config_takes_one_data_source():
    from megapairs_ray.train.config import TrainConfig

    path = Path(__file__).resolve().parents[1] / "configs" / "align-demo.yaml"
    with pytest.raises(ConfigError, match=r"either annotations .* or captions_from"):
        load_config(path, ["data.annotations=[a.jsonl]"], schema=TrainConfig)
    with pytest.raises(ConfigError, match="num_hard_negatives must be 0 with captions_from"):
        load_config(path, ["data.num_hard_negatives=2"], schema=TrainConfig)


def test_training_config_errors_name_the_field(tmp_path):
    from megapairs_ray.train.config import TrainConfig

    path = Path(__file__).resolve().parents[1] / "configs" / "train-tiny.yaml"
    with pytest.raises(ConfigError, match=r"optim\.warmup_steps must be below"):
        load_config(path, ["optim.warmup_steps=500"], schema=TrainConfig)
    with pytest.raises(ConfigError, match=r"optim\.batch_sise"):
        load_config(path, ["optim.batch_sise=3"], schema=TrainConfig)
