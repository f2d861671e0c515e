"""The exported dataset's card (README.md) and gallery (a self-contained HTML page).

The card is built from the run manifest: counts per stage, rejects by reason, the models, the
config. The gallery shows sampled triplets as a person would check them — query, instructions,
target, hard negatives, and the description they came from — with thumbnails read back from the
written tars (so it shows what a trainer will read) and embedded, so the page opens anywhere.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import yaml
from PIL import Image

from megapairs_ray import manifest
from megapairs_ray.config import RunConfig
from megapairs_ray.io import layout, storage
from megapairs_ray.io.triplets import ImageStore

THUMB = 160


def _thumb(data: bytes | Exception) -> str:
    if isinstance(data, Exception):
        return ""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    im.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(src: str, label: str, cls: str) -> str:
    if not src:
        return f'<figure class="{cls} missing"><div>image unreadable</div>' \
               f"<figcaption>{html.escape(label)}</figcaption></figure>"
    return (f'<figure class="{cls}"><img src="{src}" alt="{html.escape(label)}">'
            f"<figcaption>{html.escape(label)}</figcaption></figure>")


GALLERY_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;background:#fafafa;color:#222}
h1{font-size:22px} .triplet{background:#fff;border:1px solid #ddd;border-radius:8px;
padding:12px;margin:0 0 18px} .row{display:flex;gap:12px;align-items:flex-start}
.middle{flex:1;min-width:0;overflow-wrap:anywhere} .negatives{flex-wrap:wrap;margin-top:8px}
figure{margin:0;text-align:center;font-size:12px} figure img{width:160px;height:160px;
object-fit:cover;border-radius:4px;display:block} .query img{outline:3px solid #2b6cb0}
.target img{outline:3px solid #2f855a} .hn img{width:96px;height:96px;opacity:.9}
.missing div{width:160px;height:160px;background:#eee;display:flex;align-items:center;
justify-content:center;color:#a00} ol{margin:4px 0 0 18px;padding:0} .meta{color:#666;
font-size:12px} .desc{font-size:13px;color:#444;max-width:900px}
"""

# Counts the images that decoded, for whoever checks the page in a headless browser.
GALLERY_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  document.body.dataset.imagesLoaded = imgs.filter(function (i) {
    return i.complete && i.naturalWidth > 0; }).length;
  document.body.dataset.imagesBroken = imgs.filter(function (i) {
    return !(i.complete && i.naturalWidth > 0); }).length;
});
"""


def gallery_html(rows: list[dict[str, Any]], store: ImageStore, title: str) -> str:
    paths = sorted({p for r in rows for p in [r["q_img"], r["t_img"], *r["hns"][1:]]})
    thumbs = dict(zip(paths, (_thumb(d) for d in store.read_many(paths))))
    cards = []
    for r in rows:
        sims = ", ".join(f"{s}: {v:.3f}" for s, v in zip(r["spaces"], r["similarities"]))
        instructions = "".join(f"<li>{html.escape(t)}</li>" for t in r["q_text"])
        negatives = "".join(_img(thumbs[p], f"negative {i}", "hn")
                            for i, p in enumerate(r["hns"][1:], start=1))
        cards.append(
            f'<section class="triplet" data-pair="{r["pair_id"]}">'
            f'<div class="row">{_img(thumbs[r["q_img"]], "query", "query")}'
            f'<div class="middle"><b>instructions</b><ol>{instructions}</ol>'
            f'<p class="desc"><b>description</b>: {html.escape(r["description"])}</p>'
            f'<p class="meta">pair {r["pair_id"]} · found in {html.escape(sims)}</p></div>'
            f'{_img(thumbs[r["t_img"]], "target", "target")}</div>'
            f'<div class="row negatives"><span class="meta">hard negatives</span>{negatives}'
            "</div>"
            "</section>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{GALLERY_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class='meta'>{len(rows)} sampled triplets. Blue: query image; green: target "
            "image.</p>" + "".join(cards) + f"<script>{GALLERY_SCRIPT}</script></body></html>")


def _table(rows: list[tuple[str, Any]]) -> str:
    return "\n".join(f"| {k} | {v} |" for k, v in rows)


def dataset_card(cfg: RunConfig, doc: dict[str, Any], num_tars: int,
                 order: Sequence[str]) -> str:
    """The card: ``order`` is the pipeline's stage order (``pipeline/stages.py``)."""
    stages = doc.get("stages", {})
    counts, rejects = [], []
    for name in order:
        st = stages.get(name)
        if not st:
            continue
        counts += [(f"{name}: {k}", v) for k, v in st["counts"].items()]
        rejects += [(f"{name}: {k}", v) for k, v in st["rejects"].items()]
    models = [*((f"space `{s.name}` ({s.encoder.kind}, window {list(s.window)})",
                 s.encoder.label()) for s in cfg.embed.spaces),
              ("describe (vision-language model)", cfg.describe.model if cfg.describe else "-"),
              ("instruct (LLM)", cfg.instruct.model if cfg.instruct else "-")]
    config = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    limit = cfg.export.single_file_max_rows
    return f"""# MegaPairs-form triplets: run `{cfg.run_dir}` (profile `{cfg.profile}`)

Synthetic (query image, instructions, target image) triplets made by megapairs-ray, in the form
of the released MegaPairs dataset: one record per triplet with `q_img`, `q_text` (a list of
instructions; a trainer samples one), `t_img`, and `hns` (hard negatives; `hns[0]` is the query
image itself). Images are {cfg.export.image_size}x{cfg.export.image_size} JPEGs in {num_tars}
tar shard(s): the path `images/00003/<id>.jpg` is the member `<id>.jpg` of `images/00003.tar`.

## Files
| file | what |
|---|---|
| `parts/part-*.jsonl` | the triplets, one JSON object per line |
| `parts/part-*.parquet` | the same rows, a parquet part beside each JSON-lines part |
| `megapairs.jsonl`, `megapairs.parquet` | the parts joined (runs up to {limit:,} triplets) |
| `_SUCCESS` | written last: the export is whole |
| `images/*.tar` | the images the triplets name |
| `gallery.html` | sampled triplets, to look at in a browser |

Besides the four released fields each record keeps its provenance: `pair_id`, `query_id`,
`target_id`, `hard_negative_ids`, the similarity `spaces` the pair was found in with their
`similarities`, the `description` the instructions were written from, and the models used.

## Models
{_table([("step", "model"), ("---", "---"), *models])}

## Counts per stage
{_table([("stage: count", "value"), ("---", "---"), *counts])}

## Rejects by reason
{_table([("stage: reason", "count"), ("---", "---"), *rejects]) if rejects else "None."}

## Train on it
```
megapairs train --config configs/train-paper.yaml \\
  --set data.annotations='[{storage.join(layout.triplet_parts_dir(cfg.run_dir), "*.jsonl")}]' \\
  --set data.image_root={storage.join(cfg.run_dir, "triplets")}
```

## Config
```yaml
{config}```
"""


def sample_rows(parts_dir: str, k: int, seed: int) -> list[dict[str, Any]]:
    """``k`` triplets drawn with ``seed`` from the parquet parts: parts are read in a seeded
    order only until there are enough rows to draw from, never the whole export."""
    files = storage.list_files(parts_dir, ".parquet")
    if not files or k == 0:
        return []
    rng = np.random.default_rng(seed)
    tables, rows = [], 0
    for i in rng.permutation(len(files)):
        tables.append(storage.read_parquet(files[i]))
        rows += tables[-1].num_rows
        if rows >= 4 * k:
            break
    t = pa.concat_tables(tables)
    idx = np.sort(rng.choice(t.num_rows, size=min(k, t.num_rows), replace=False))
    return t.take(pa.array(idx)).to_pylist()


def write_card_and_gallery(cfg: RunConfig, out: str, num_tars: int,
                           order: Sequence[str]) -> None:
    """``RUN/triplets/gallery.html`` and ``README.md`` (the dataset card)."""
    rows = sample_rows(layout.triplet_parts_dir(cfg.run_dir), cfg.export.gallery_size,
                       cfg.export.seed)
    page = gallery_html(rows, ImageStore(out), f"megapairs-ray triplets: {cfg.run_dir}")
    with storage.open_atomic(storage.join(out, "gallery.html"), "wb") as f:
        f.write(page.encode())
    card = dataset_card(cfg, manifest.load(cfg.run_dir), num_tars, order)
    with storage.open_atomic(storage.join(out, "README.md"), "wb") as f:
        f.write(card.encode())
