"""The serve config file: Ray's own schema accepts it, our checks refuse what Ray's would let
through silently, and the commands turn every mistake into one line naming it."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from megapairs_ray.cli import app
from megapairs_ray.config import ConfigError, load_config
from megapairs_ray.serve.config import (
    GalleryConfig,
    ServeAppConfig,
    load_serve_file,
    validate_serve_doc,
)

REPO = Path(__file__).resolve().parents[1]
SERVE_FILES = sorted((REPO / "configs").glob("serve-*.yaml"))


def test_the_application_module_imports_no_torch():
    """Serve's controller imports the application to build it, and every replica imports it;
    only the replicas that encode need torch and the model code (they load it themselves).
    Imported with the module, it cost the search and routing replicas seconds of CPU each."""
    code = ("import sys; import megapairs_ray.serve.app; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert out.strip() == "[]", out


def _doc(name: str = "serve-tiny.yaml") -> dict:
    return yaml.safe_load((REPO / "configs" / name).read_text())


@pytest.mark.parametrize("path", SERVE_FILES, ids=lambda p: p.name)
def test_serve_files_pass_rays_schema_and_ours(path):
    from ray.serve.schema import ServeDeploySchema

    doc, schema, apps = load_serve_file(path)
    assert isinstance(schema, ServeDeploySchema)
    assert ServeDeploySchema.model_validate(doc).applications[0].import_path == \
        "megapairs_ray.serve.app:build_app"
    (cfg,) = apps.values()
    assert isinstance(cfg, ServeAppConfig)
    for section in (cfg.query_encoder, cfg.search):
        assert section.max_ongoing_requests >= section.max_batch_size


def test_the_import_path_names_the_builder():
    from megapairs_ray.serve import app as serve_app

    assert callable(serve_app.build_app)


def test_gallery_profiles_load():
    for name in ("gallery-tiny.yaml", "gallery-paper.yaml"):
        cfg = load_config(REPO / "configs" / name, schema=GalleryConfig)
        assert (cfg.input is None) != (cfg.images_from is None)


@pytest.mark.parametrize("where, key", [
    ((), "proxy_locaton"),
    (("http_options",), "prot"),
    (("applications", 0), "route_prefx"),
])
def test_keys_rays_schema_ignores_are_refused(where, key):
    doc = _doc()
    node = doc
    for w in where:
        node = node[w]
    node[key] = "x"
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(doc)  # Ray's own schema lets it through...
    with pytest.raises(ConfigError, match=key):  # ...ours does not
        validate_serve_doc(doc, "test")


@pytest.mark.parametrize("change, message", [
    ({"query_encoder": {"max_batch_size": 64, "max_ongoing_requests": 8}},
     "must be >= max_batch_size"),
    ({"query_encoder": {"device": "cuda"}}, "num_gpus > 0"),
    ({"limits": {"default_top_k": 50, "max_top_k": 10}}, "default_top_k"),
    ({"url_fetch": {"enabled": True}}, "allowed_prefixes"),
    ({"url_fetch": {"enabled": True, "allowed_prefixes": ["https://example.org/"]}},
     "only storage prefixes"),
    ({"search": {"autoscaling": {"min_replicas": 3, "max_replicas": 1}}}, "min_replicas"),
    ({"gallery_dirr": "x"}, "gallery_dirr"),
    ({"limits": {"max_top_k": "many"}}, "max_top_k"),
])
def test_bad_application_args_name_the_field(change, message):
    doc = _doc()
    args = doc["applications"][0]["args"]
    for k, v in change.items():
        args[k] = {**args.get(k, {}), **v} if isinstance(v, dict) else v
    with pytest.raises(ConfigError, match=message):
        validate_serve_doc(doc, "test")


def test_a_file_without_our_application_is_refused():
    doc = _doc()
    doc["applications"][0]["import_path"] = "somewhere.else:app"
    with pytest.raises(ConfigError, match="no application with import_path"):
        validate_serve_doc(doc, "test")
    with pytest.raises(ConfigError, match="not a valid Ray Serve config"):
        validate_serve_doc({"applications": "nope"}, "test")


def test_deployment_overrides_belong_in_args(tmp_path):
    from megapairs_ray.serve.deploy import deploy

    doc = copy.deepcopy(_doc())
    doc["applications"][0]["deployments"] = [{"name": "QueryEncoder", "num_replicas": 2}]
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="deployment options in args"):
        deploy(path)


def test_commands_answer_mistakes_in_one_line(tmp_path):
    runner = CliRunner()
    # --fast-path off: the command sets Ray Serve's switches in this (the test's) process.
    missing = runner.invoke(app, ["serve", "-c", str(tmp_path / "nope.yaml"), "--fast-path", "off"])
    assert missing.exit_code == 2 and "serve config not found" in missing.output
    assert "Traceback" not in missing.output
    doc = _doc()
    doc["applications"][0]["args"]["gallery_dir"] = str(tmp_path / "no-gallery")
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(doc))
    no_gallery = runner.invoke(app, ["serve", "-c", str(path), "--detach", "--fast-path", "off"])
    assert "RAY_SERVE_THROUGHPUT_OPTIMIZED" not in os.environ
    assert no_gallery.exit_code == 1, no_gallery.output
    assert "no finished gallery" in no_gallery.output and "Traceback" not in no_gallery.output
    bad = tmp_path / "gallery.yaml"
    bad.write_text("profile: x\nrun_dir: g\ncheckpoint: c\n")
    out = runner.invoke(app, ["gallery", "-c", str(bad)])
    assert out.exit_code == 2 and "exactly one gallery source" in out.output


def test_auto_precision_is_bf16_only_where_the_hardware_has_it():
    from megapairs_ray.models.retriever import resolve_precision

    assert resolve_precision("auto", "cpu", {"avx2", "avx512f", "avx512_bf16"}) == "bf16"
    assert resolve_precision("auto", "cpu", {"amx_bf16", "amx_tile"}) == "bf16"
    assert resolve_precision("auto", "cpu", {"avx2", "avx512f"}) == "fp32"
    assert resolve_precision("fp32", "cpu", {"avx512_bf16"}) == "fp32"
    assert resolve_precision("bf16", "cpu", set()) == "bf16"


def test_bf16_queries_stay_within_the_ranking_tolerance_of_fp32(tmp_path):
    """The serving default on AVX-512 BF16 CPUs: query embeddings at cosine >= 0.999 to fp32."""

    from megapairs_ray.models.retriever import RetrieverEncoder

    from .helpers import jpeg
    from .serve_helpers import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "ckpt")
    images = [jpeg(i, (80, 64)) for i in range(4)] + [None, None]
    texts = ["more red", None, "darker", None, "a cat", "two dogs"]
    fp32 = RetrieverEncoder(ckpt, precision="fp32").queries(images, texts)
    bf16 = RetrieverEncoder(ckpt, precision="bf16").queries(images, texts)
    assert ((fp32 * bf16).sum(axis=1) >= 0.999).all()
