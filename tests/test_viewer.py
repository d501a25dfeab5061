"""``neuroloc view``: the web viewer's API through Starlette's TestClient, on generated results and images.

Only the tests that take the ``lite0`` fixture run the real model (one small image each); the rest never
load it. The module is skipped without the optional ``view`` extra (``pip install -e ".[view]"``, which
.ci/run installs).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("starlette", reason='the viewer needs the optional extra: pip install -e ".[view]"')
pytest.importorskip("multipart", reason='the viewer needs python-multipart: pip install -e ".[view]"')
from starlette.testclient import TestClient

from neuroloc.classes import imagenet_classes
from neuroloc.viewer.app import LOOPBACK_HOSTS, create_app
from neuroloc.viewer.compute import settings_beyond_knobs, suggest_knobs
from neuroloc.viewer.index import load_results

CLASSES = imagenet_classes()
N_RECORDS = 250


def _unused_model():
    raise AssertionError("this test must not load the model")


def _picture(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> Path:
    image = Image.new("RGB", size, colour)
    for x in range(size[0] // 4, size[0] // 2):  # a darker square, so the picture is not flat
        for y in range(size[1] // 4, size[1] // 2):
            image.putpixel((x, y), (colour[0] // 3, colour[1] // 3, colour[2] // 3))
    image.save(path)
    return path


@pytest.fixture()
def pictures(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "imgs"
    folder.mkdir()
    sizes = [(64, 48), (48, 64), (80, 60), (60, 60), (100, 50)]
    return [_picture(folder / f"p{i}.png", size, (40 * i + 50, 200 - 30 * i, 120)) for i, size in enumerate(sizes)]


def _confidence(i: int) -> float | None:
    """The confidence of record ``i``: missing on every tenth (as in results written before it existed)."""
    return None if i % 10 == 5 else round(((i * 53) % 97) / 100, 4)


def _record(i: int, image: str, size: tuple[int, int], confidence: bool = True) -> dict:
    """One localize line; ``confidence=False`` writes the format from before the confidence existed."""
    cls = CLASSES[(i * 7) % 5 * 100]  # five classes
    error = "imgs/broken.png: not an image file" if i % 25 == 24 else None
    record = {"image": image, "width": size[0], "height": size[1], "model": "efficientnet_lite0", "error": error,
              "predictions": []}
    if error is None:
        score = None if i % 10 == 3 else round(((i * 37) % 101) / 100, 4)
        record["predictions"] = [{
            "label": cls.index, "synset": cls.synset, "name": cls.name, "score": score,
            "box": [1.0, 2.0, size[0] - 1.0, size[1] - 2.0], "layer": "_blocks.10", "empty": i % 50 == 7,
            "neurons": [{"channel": j, "y": 1, "x": 2, "dam_score": 0.5 - j / 10, "region_score": None,
                         "blob_fraction": 0.1, "kept": j < 2} for j in range(3)],
        }]
        if confidence:
            value = _confidence(i)
            record["predictions"][0]["confidence"] = value
            record["predictions"][0]["confidence_parts"] = None if value is None else {
                "stability": 0.9, "concentration": round(value, 4), "agreement": None if i % 3 else 0.25}
    return record


@pytest.fixture()
def results_jsonl(tmp_path: Path, pictures: list[Path]) -> Path:
    path = tmp_path / "out" / "boxes.jsonl"
    path.parent.mkdir()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(N_RECORDS):
            picture = pictures[i % len(pictures)]
            with Image.open(picture) as im:
                size = im.size
            f.write(json.dumps(_record(i, str(picture), size)) + "\n")
        f.write('{"image": "cut short by a kill", "wid')  # a last line without newline or end
    return path


@pytest.fixture()
def client(results_jsonl: Path, tmp_path: Path) -> TestClient:
    return TestClient(create_app(results_jsonl, model=_unused_model, cache_dir=tmp_path / "cache"))


# --- gallery API ----------------------------------------------------------------------------------------


def test_info_describes_a_jsonl(client: TestClient, results_jsonl: Path) -> None:
    info = client.get("/api/info").json()
    assert info["mode"] == "jsonl"
    assert info["sources"] == [{"name": "results", "count": N_RECORDS}]
    assert info["default_source"] == "results"
    assert {"default", "paper"} <= set(info["presets"])
    assert any("unreadable" in w for w in info["warnings"])  # the cut-off last line


def test_pages_cover_every_item_once(client: TestClient) -> None:
    seen = []
    for offset in range(0, N_RECORDS, 40):
        page = client.get("/api/items", params={"offset": offset, "limit": 40}).json()
        assert page["total"] == N_RECORDS
        seen += [item["id"] for item in page["items"]]
    assert len(seen) == len(set(seen)) == N_RECORDS
    page = client.get("/api/items", params={"offset": 80, "limit": 3}).json()
    assert [Path(item["image"]).name for item in page["items"]] == ["p0.png", "p1.png", "p2.png"]
    assert client.get("/api/items", params={"offset": 10_000}).json()["items"] == []


def test_sort_by_score_puts_missing_scores_last(client: TestClient) -> None:
    for order in ("asc", "desc"):
        items = client.get("/api/items", params={"sort": "score", "order": order, "limit": 500}).json()["items"]
        scores = [item["score"] for item in items]
        known = [s for s in scores if s is not None]
        assert known == sorted(known, reverse=order == "desc")
        assert scores[len(known):] == [None] * (len(scores) - len(known))  # errors and missing scores last
    names = [i["class"] for i in client.get("/api/items", params={"sort": "class", "limit": 500}).json()["items"]]
    assert [n for n in names if n] == sorted(n for n in names if n)


def test_filters_by_class_score_text_and_errors(client: TestClient) -> None:
    label = CLASSES[100].index
    page = client.get("/api/items", params={"label": label, "limit": 500}).json()
    assert page["total"] > 0 and all(item["label"] == label for item in page["items"])
    errors = client.get("/api/items", params={"status": "error", "limit": 500}).json()
    assert errors["total"] == N_RECORDS // 25 and all(item["error"] for item in errors["items"])
    ok = client.get("/api/items", params={"status": "ok"}).json()
    assert ok["total"] == N_RECORDS - errors["total"]
    ranged = client.get("/api/items", params={"min_score": 0.2, "max_score": 0.4, "limit": 500}).json()
    assert ranged["total"] > 0 and all(0.2 <= item["score"] <= 0.4 for item in ranged["items"])
    by_name = client.get("/api/items", params={"q": "p3.png"}).json()
    assert by_name["total"] == N_RECORDS // 5
    assert client.get("/api/items", params={"q": "%"}).json()["total"] == 0  # LIKE wildcards are literal
    empty = client.get("/api/items", params={"status": "empty"}).json()
    assert empty["total"] == N_RECORDS // 50 and all(item["empty"] for item in empty["items"])
    summary = client.get("/api/summary").json()
    assert summary["total"] == N_RECORDS and summary["has_score"] and not summary["has_iou"]
    assert sum(c["count"] for c in summary["classes"]) == N_RECORDS - errors["total"]


def test_sort_by_confidence_puts_missing_confidences_last(client: TestClient) -> None:
    expected = sorted(_confidence(i) for i in range(N_RECORDS) if i % 25 != 24 and _confidence(i) is not None)
    for order in ("asc", "desc"):
        items = client.get("/api/items", params={"sort": "confidence", "order": order, "limit": 500}).json()["items"]
        assert len(items) == N_RECORDS
        values = [item["confidence"] for item in items]
        known = [v for v in values if v is not None]
        assert known == (expected if order == "asc" else expected[::-1])
        assert values[len(known):] == [None] * (N_RECORDS - len(known))  # errors and old lines last, both ways
        ties = [(item["confidence"], item["id"]) for item in items]  # equal values keep the file order
        assert ties == sorted(ties, key=lambda t: (t[0] is None, (t[0] or 0) * (1 if order == "asc" else -1),
                                                  t[1] * (1 if order == "asc" else -1)))
    first = client.get("/api/items", params={"sort": "confidence", "order": "asc", "limit": 1}).json()["items"][0]
    assert first["confidence"] == expected[0]  # the review order: the least confident box first


def test_filters_by_confidence(client: TestClient) -> None:
    wanted = [i for i in range(N_RECORDS) if i % 25 != 24 and _confidence(i) is not None and 0.2 <= _confidence(i) <= 0.5]
    ranged = client.get("/api/items", params={"min_confidence": 0.2, "max_confidence": 0.5, "limit": 500}).json()
    assert ranged["total"] == len(wanted) > 0
    assert all(0.2 <= item["confidence"] <= 0.5 for item in ranged["items"])
    above = client.get("/api/items", params={"min_confidence": 0}).json()["total"]
    below = client.get("/api/items", params={"max_confidence": 1}).json()["total"]
    known = sum(1 for i in range(N_RECORDS) if i % 25 != 24 and _confidence(i) is not None)
    assert above == below == known  # a missing confidence is in no range
    both = client.get("/api/items", params={"min_confidence": 0.3, "min_score": 0.5, "sort": "confidence",
                                            "limit": 500}).json()["items"]
    assert both and all(item["confidence"] >= 0.3 and item["score"] >= 0.5 for item in both)
    assert client.get("/api/summary").json()["has_confidence"]
    assert "confidence" in client.get("/api/info").json()["sorts"]


def test_item_carries_its_confidence_and_parts(client: TestClient) -> None:
    item = client.get("/api/items/3").json()  # line 2
    assert item["confidence"] == _confidence(2)
    assert item["boxes"][0]["confidence"] == _confidence(2)
    assert item["record"]["predictions"][0]["confidence_parts"] == {
        "stability": 0.9, "concentration": _confidence(2), "agreement": 0.25 if 2 % 3 == 0 else None}
    missing = client.get("/api/items/6").json()  # line 5: written without a confidence
    assert missing["confidence"] is None and missing["record"]["predictions"][0]["confidence_parts"] is None


def test_results_without_confidence_still_work(tmp_path: Path, pictures: list[Path]) -> None:
    """A file written before the confidence existed: no field at all. The index is built from the file at
    every start-up (in memory), so there is no older index to migrate; the column is simply empty."""
    results = tmp_path / "old.jsonl"
    results.write_text("".join(json.dumps(_record(i, str(pictures[i % 5]), (64, 48), confidence=False)) + "\n"
                               for i in range(20)))
    client = TestClient(create_app(results, model=_unused_model, cache_dir=tmp_path / "cache"))
    for order in ("asc", "desc"):
        items = client.get("/api/items", params={"sort": "confidence", "order": order}).json()["items"]
        assert [item["confidence"] for item in items] == [None] * 20
        assert [item["id"] for item in items] == sorted((item["id"] for item in items), reverse=order == "desc")
    assert client.get("/api/items", params={"min_confidence": 0}).json()["total"] == 0
    summary = client.get("/api/summary").json()
    assert not summary["has_confidence"] and summary["has_score"]  # the page hides the confidence filter
    item = client.get("/api/items/1").json()
    assert item["confidence"] is None and "confidence" not in item["record"]["predictions"][0]
    scores = [i["score"] for i in client.get("/api/items", params={"sort": "score"}).json()["items"]]
    assert [s for s in scores if s is not None] == sorted(s for s in scores if s is not None)


# The pages are static: their scripts build the cards and facts tables. Run those functions in Node.js
# against a minimal stand-in for the DOM, and read the text they put into the page.
FAKE_DOM = r"""
class FakeNode {
  constructor(tag) { this.tagName = tag; this.children = []; this.attributes = {}; this.style = {}; this.hidden = false;
    this.value = ""; this.checked = true; this.classList = { add() {}, remove() {} };
    this.options = tag === "select" ? [new FakeNode("option"), new FakeNode("option"), new FakeNode("option")] : []; }
  append(...children) { for (const c of children) this.children.push(typeof c === "string" ? document.createTextNode(c) : c); }
  replaceChildren(...children) { this.children = []; this.append(...children); }
  setAttribute(k, v) { this.attributes[k] = v; }
  addEventListener() {}
  remove() {}
  closest() { return new FakeNode("label"); }
  set textContent(v) { this.children = [document.createTextNode(v)]; }
  get textContent() { return this.children.map((c) => c.textContent).join(" "); }
}
class FakeText extends FakeNode { constructor(t) { super("#text"); this.text = String(t); } get textContent() { return this.text; } }
const byId = {};
globalThis.Node = FakeNode;
globalThis.document = { title: "", createElement: (t) => new FakeNode(t), createTextNode: (t) => new FakeText(t),
  addEventListener() {}, getElementById: (id) => byId[id] || (byId[id] = new FakeNode(id === "overlay-kind" ? "select" : "div")),
  querySelector: () => new FakeNode("div"), querySelectorAll: () => [] };
globalThis.location = { pathname: "/item/1", search: "" };
globalThis.window = { addEventListener() {}, location: {} };
"""


def _run_page_script(script: str, test: str) -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed")
    static = Path(__file__).resolve().parents[1] / "src" / "neuroloc" / "viewer" / "static"
    program = "\n".join([FAKE_DOM, (static / "common.js").read_text(), (static / script).read_text(), test])
    done = subprocess.run([node, "-"], input=program, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_gallery_card_shows_the_confidence(client: TestClient) -> None:
    items = client.get("/api/items", params={"sort": "confidence", "limit": 500}).json()["items"]
    known, missing = items[0], next(item for item in items if item["confidence"] is None and not item["error"])
    out = json.loads(_run_page_script("gallery.js", f"""
        console.log(JSON.stringify([card({json.dumps(known)}, 320).textContent, card({json.dumps(missing)}, 320).textContent]));
    """))
    assert f"conf {100 * known['confidence']:.1f}%" in out[0]  # formatted like the score
    assert f"{100 * known['score']:.1f}%" in out[0]
    assert "conf" not in out[1]
    page = client.get("/").text
    assert '<option value="confidence"' in page and 'name="min_confidence"' in page and 'name="max_confidence"' in page
    assert 'id="review"' in page  # the "least confident first" button


def test_evaluation_summary_links_the_report_and_the_class_table(eval_client: TestClient) -> None:
    metrics = eval_client.get("/api/metrics").json()
    out = _run_page_script("gallery.js", f"""
        api = async () => ({json.dumps(metrics)});
        loadMetrics().then(() => {{
          const links = document.getElementById("report-link").children.filter((c) => c.tagName === "a");
          console.log(JSON.stringify(links.map((a) => [a.attributes.href, a.textContent])));
        }});
    """)
    assert json.loads(out) == [["/files/report.md", "report.md"], ["/files/per_class.csv", "per_class.csv (every class)"]]


def test_image_page_shows_the_confidence_and_its_parts(client: TestClient) -> None:
    item = client.get("/api/items/1").json()  # line 0: all three parts
    result = {"name": "tabby, tabby cat", "label": 281, "synset": "n02123045", "probability": 0.5, "box": [0, 0, 5, 5],
              "empty": False, "mode": "density", "layer": "_blocks.10", "config": {}, "model": "m", "top5": [],
              "neurons": [], "width": 64, "height": 48, "short_name": "tabby", "confidence": 0.4321,
              "confidence_parts": {"stability": 0.5, "concentration": 0.3, "agreement": None}}
    data = {"result": result, "pictures": {"mask": "/m", "density": None, "maps": [], "blobs": []}}
    out = json.loads(_run_page_script("item.js", f"""
        item = {json.dumps(item)};
        info = {{ presets: {{}} }};
        showItem();
        showResult({json.dumps(data)});
        console.log(JSON.stringify([document.getElementById("record").textContent, document.getElementById("summary").textContent]));
    """))
    recorded, recomputed = out
    parts = item["record"]["predictions"][0]["confidence_parts"]
    assert f"confidence {100 * item['confidence']:.1f}%" in recorded
    assert f"stability {100 * parts['stability']:.1f}%" in recorded and f"agreement {100 * parts['agreement']:.1f}%" in recorded
    assert "confidence 43.2%" in recomputed
    assert "stability 50.0% · concentration 30.0% · agreement –" in recomputed  # no Grad-CAM reference: a dash
    assert "feature directions none: no objectness map" in recomputed
    item["record"]["predictions"][0]["box"] = "1,2,3,4"  # an edited line: the page still shows the rest
    shown = json.loads(_run_page_script("item.js", f"""
        item = {json.dumps(item)};
        info = {{ presets: {{}} }};
        showItem();
        console.log(JSON.stringify(document.getElementById("record").textContent));
    """))
    assert "confidence" in shown and "1,2,3,4" not in shown


@pytest.mark.parametrize("params", [{"sort": "DROP TABLE"}, {"order": "sideways"}, {"status": "odd"},
                                    {"offset": "x"}, {"limit": "-1"}, {"min_iou": "high"},
                                    {"min_confidence": "low"}, {"max_confidence": "nan"}])
def test_bad_queries_get_a_json_error(client: TestClient, params: dict) -> None:
    response = client.get("/api/items", params=params)
    assert response.status_code == 400
    assert response.json()["error"]


def test_unknown_source_and_item_are_404(client: TestClient) -> None:
    assert client.get("/api/items", params={"source": "nope"}).status_code == 404
    response = client.get("/api/items/99999")
    assert response.status_code == 404 and response.json()["error"]


def test_item_detail_has_the_full_line(client: TestClient) -> None:
    item = client.get("/api/items/1").json()
    assert item["record"]["predictions"][0]["neurons"][0]["channel"] == 0  # read back from the file
    assert item["boxes"][0]["box"] == [1.0, 2.0, 63.0, 46.0]
    assert item["suggested_knobs"] == {"preset": "default"}


def test_thumbnails_are_made_once_and_follow_the_file(client: TestClient, pictures: list[Path], tmp_path: Path) -> None:
    response = client.get("/api/items/1/thumb", params={"size": 160})
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(response.content)).size == (64, 48)  # never enlarged
    cached = list((tmp_path / "cache").rglob("*.jpg"))
    assert len(cached) == 1
    client.get("/api/items/6/thumb", params={"size": 160})  # item 6 shows the same picture
    assert list((tmp_path / "cache").rglob("*.jpg")) == cached
    _picture(pictures[0], (64, 48), (0, 0, 255))  # the image changes: a new thumbnail
    stat = pictures[0].stat()
    os.utime(pictures[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert client.get("/api/items/1/thumb", params={"size": 160}).status_code == 200
    assert len(list((tmp_path / "cache").rglob("*.jpg"))) == 2
    assert client.get("/api/items/1/thumb", params={"size": 999}).status_code == 400  # only fixed sizes
    letters = client.get("/api/items/1/thumb", params={"size": "abc"})
    assert letters.status_code == 400 and letters.json()["error"] == "size must be a number of pixels, not 'abc'"
    # asked again every time (an item's address is another image after a restart), 304 while unchanged
    first = client.get("/api/items/1/thumb", params={"size": 160})
    assert first.headers["cache-control"] == "private, no-cache" and first.headers["etag"]
    same = client.get("/api/items/1/thumb", params={"size": 160}, headers={"If-None-Match": first.headers["etag"]})
    assert same.status_code == 304 and not same.content
    weak = client.get("/api/items/1/thumb", params={"size": 160}, headers={"If-None-Match": f'"x", W/{first.headers["etag"]}'})
    assert weak.status_code == 304  # a weak validator, among others
    other = client.get("/api/items/3/thumb", params={"size": 160}, headers={"If-None-Match": first.headers["etag"]})
    assert other.status_code == 200 and other.headers["etag"] != first.headers["etag"]
    pictures[1].unlink()
    missing = client.get("/api/items/2/thumb")
    assert missing.status_code == 404 and "no such file" in missing.json()["error"]


def test_relative_image_paths_are_found_from_the_results_folder(tmp_path: Path, pictures: list[Path]) -> None:
    results = tmp_path / "out" / "rel.jsonl"
    results.parent.mkdir()
    results.write_text(json.dumps(_record(0, "imgs/p0.png", (64, 48))) + "\n")  # relative to tmp_path
    app = create_app(results, model=_unused_model, cache_dir=tmp_path / "cache")
    assert TestClient(app).get("/api/items/1/thumb").status_code == 200


def test_a_relative_path_means_the_same_file_whatever_was_opened_before(tmp_path: Path, pictures: list[Path],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Looked up from the current folder first, every time: an item opened under the results folder does not
    make the next one come from there."""
    here, out = tmp_path / "here", tmp_path / "out"
    for folder, names in ((here, ["same.png"]), (out, ["same.png", "only.png"])):
        (folder / "imgs").mkdir(parents=True)
        for name in names:
            (folder / "imgs" / name).write_bytes(pictures[0].read_bytes())
    results = out / "rel.jsonl"
    results.write_text("".join(json.dumps(_record(i, f"imgs/{name}", (64, 48))) + "\n"
                               for i, name in enumerate(["same.png", "only.png", "same.png"])))
    monkeypatch.chdir(here)
    index = load_results(results)
    rows = [index.row(i) for i in (1, 2, 3)]
    assert [index.image_path(r) for r in rows if r is not None] == [here / "imgs" / "same.png", out / "imgs" / "only.png",
                                                   here / "imgs" / "same.png"]


def test_a_relative_path_is_looked_up_first_where_the_run_started(tmp_path: Path, pictures: list[Path],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from neuroloc.jsonl import settings_path

    started, elsewhere = tmp_path / "started", tmp_path / "elsewhere"
    for folder in (started, elsewhere):
        (folder / "imgs").mkdir(parents=True)
        (folder / "imgs" / "x.png").write_bytes(pictures[0].read_bytes())
    results = started / "out" / "r.jsonl"
    results.parent.mkdir()
    results.write_text(json.dumps(_record(0, "imgs/x.png", (64, 48))) + "\n")
    settings_path(results).write_text(json.dumps({"folder": str(started)}), encoding="utf-8")
    monkeypatch.chdir(elsewhere)
    index = load_results(results)
    assert index.image_path(index.row(1) or {}) == started / "imgs" / "x.png"


def test_a_cache_folder_whose_name_is_not_utf8_serves_thumbnails(results_jsonl: Path, tmp_path: Path) -> None:
    cache = Path(os.fsdecode(tmp_path.as_posix().encode() + b"/cache_\xff"))
    client = TestClient(create_app(results_jsonl, model=_unused_model, cache_dir=cache))
    response = client.get("/api/items/1/thumb", params={"size": 160})
    assert response.status_code == 200 and response.headers["etag"]


def test_a_file_name_that_is_not_utf8_is_shown_and_its_thumbnail_found(tmp_path: Path, pictures: list[Path]) -> None:
    """localize writes such a name with lone surrogates ("caf\\udce9.png"); SQLite and JSON take none."""
    odd = os.fsdecode(b"caf\xe9.png")
    (tmp_path / "imgs" / "p0.png").rename(tmp_path / "imgs" / odd)
    line = {**_record(0, str(tmp_path / "imgs" / odd), (64, 48)), "error": f"{odd}: a note naming the file"}
    results = tmp_path / "odd.jsonl"
    results.write_text(json.dumps(line) + "\n", encoding="utf-8")
    client = TestClient(create_app(results, model=_unused_model, cache_dir=tmp_path / "cache"))
    (item,) = client.get("/api/items").json()["items"]
    assert item["name"] == "caf\ufffd.png" and item["error"].startswith("caf\ufffd.png")
    assert client.get("/api/items/1").json()["record"]["image"] == line["image"]  # the full line is found again
    assert client.get("/api/items/1/thumb").status_code == 200


def test_lines_of_the_wrong_shape_are_skipped_or_read_as_far_as_they_make_sense(tmp_path: Path, pictures: list[Path]) -> None:
    good = _record(0, str(pictures[0]), (64, 48))
    lines = [
        json.dumps({"image": "a.jpg", "predictions": {"x": 1}}),
        json.dumps({"image": "b.jpg", "predictions": 5}),
        json.dumps({**good, "image": "c.jpg", "width": 10**30, "predictions": [{**good["predictions"][0], "label": 10**30}]}),
        json.dumps(good),
    ]
    results = tmp_path / "shapes.jsonl"
    results.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")  # and a byte order mark first
    client = TestClient(create_app(results, model=_unused_model, cache_dir=tmp_path / "cache"))
    items = client.get("/api/items").json()["items"]
    assert [i["name"] for i in items] == ["a.jpg", "b.jpg", "c.jpg", "p0.png"]
    assert items[2]["label"] is None and items[2]["width"] is None and items[3]["boxes"]
    assert client.get("/api/items/1").json()["record"]["image"] == "a.jpg"  # the line after the mark reads back


def test_pages_are_static_and_self_contained(client: TestClient) -> None:
    for url in ("/", "/item/1", "/static/gallery.js", "/static/item.js", "/static/common.js", "/static/style.css"):
        response = client.get(url)
        assert response.status_code == 200
        assert "://" not in response.text  # no CDN, nothing from elsewhere
        assert "innerHTML" not in response.text  # data goes in as text
    page = client.get("/")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"


def test_names_are_data_not_markup(tmp_path: Path, pictures: list[Path]) -> None:
    evil = "<img src=x onerror=alert(1)>{{7*7}}.png"
    results = tmp_path / "evil.jsonl"
    results.write_text(json.dumps(_record(0, evil, (10, 10))) + "\n")
    client = TestClient(create_app(results, model=_unused_model, cache_dir=tmp_path / "cache"))
    assert client.get("/api/items").json()["items"][0]["name"] == evil  # returned as JSON text
    assert client.get("/api/items").headers["content-type"] == "application/json"
    assert "alert" not in client.get("/").text and "alert" not in client.get("/item/1").text


# --- safety -----------------------------------------------------------------------------------------------


EVAL_CONFIDENCE = [0.9, None, 0.2, 0.6, 0.1]  # the dam method's, by image; center gives none


@pytest.fixture()
def evaluation(tmp_path: Path, pictures: list[Path]) -> Path:
    """An evaluate output folder, with the dataset it names (images/ + boxes.csv)."""
    dataset = tmp_path / "data"
    (dataset / "images").mkdir(parents=True)
    truths = {}
    rows = ["image,synset,label,xmin,ymin,xmax,ymax"]
    for i, picture in enumerate(pictures):
        name = f"img{i}.png"
        (dataset / "images" / name).write_bytes(picture.read_bytes())
        truths[name] = (CLASSES[i].index, (0.0, 0.0, 40.0, 40.0))
        rows.append(f"{name},{CLASSES[i].synset},{CLASSES[i].index},0,0,40,40")
    (dataset / "boxes.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "eval"
    # dam finds the truth box exactly on image 0, half of it on image 1 ...; centre is wrong on every image
    boxes = {"dam": [(0, 0, 40, 40), (0, 0, 20, 40), (0, 0, 10, 10), (20, 20, 40, 40), (30, 30, 50, 50)],
             "center": [(45, 45, 60, 60)] * 5}
    for method, method_boxes in boxes.items():
        (out / method).mkdir(parents=True)
        lines = []
        for i, (name, (label, _)) in enumerate(truths.items()):
            image = str(Path(os.path.relpath(dataset, Path.cwd())) / "images" / name)
            prediction = {"label": label, "synset": CLASSES[label].synset, "name": CLASSES[label].name,
                          "box": list(map(float, method_boxes[i]))}
            if method == "dam" and EVAL_CONFIDENCE[i] is not None:  # as the harness writes it: dam only
                prediction["confidence"] = EVAL_CONFIDENCE[i]
            lines.append(json.dumps({
                "image": image, "width": 100, "height": 100, "model": "efficientnet_lite0",
                "predictions": [prediction], "top1": label if i != 2 else 999, "seconds": 0.01, "error": None}))
        (out / method / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    (out / "dam" / "method.json").write_text(json.dumps({"method": "dam", **_paper_settings()}))
    metrics = {"run": {"dataset": os.path.relpath(dataset, Path.cwd()), "model": "efficientnet_lite0", "images": 5},
               "methods": {"center": {"gt_known": 0.0, "mean_iou": 0.0}, "dam": {"gt_known": 40.0, "mean_iou": 0.5}},
               "halves": {}}
    (out / "metrics.json").write_text(json.dumps(metrics))
    (out / "plots").mkdir()
    Image.new("RGB", (20, 10), "white").save(out / "plots" / "iou_histogram.png")
    (out / "report.md").write_text("# report\n")
    (out / "per_class.csv").write_text("label,synset,name,images,dam:gt_known\n0,n01440764,tench,2,50.0\n")
    (tmp_path / "secret.txt").write_text("not for the browser")
    (tmp_path / "secret.png").write_bytes((out / "plots" / "iou_histogram.png").read_bytes())
    (out / ".hidden.png").write_bytes(b"x")
    (out / "code.py").write_text("print('hi')")
    (out / "plots" / "link.png").symlink_to(tmp_path / "secret.png")
    (out / "escape").symlink_to(tmp_path)
    return out


def _paper_settings() -> dict:
    from neuroloc.config import PRESETS

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in PRESETS["paper"].with_options(kmax=20).to_dict().items()}


@pytest.fixture()
def eval_client(evaluation: Path, tmp_path: Path) -> TestClient:
    return TestClient(create_app(evaluation, model=_unused_model, cache_dir=tmp_path / "cache"))


@pytest.mark.parametrize("url", [
    "/files/..%2Fsecret.txt",
    "/files/%2E%2E/secret.txt",
    "/files/plots/..%2F..%2Fsecret.png",
    "/files/%2Fetc%2Fpasswd",
    "/files//etc/passwd",
    "/files/plots/link.png",          # a symlink to a file outside the folder
    "/files/escape/secret.png",       # a symlinked folder leading outside
    "/files/.hidden.png",
    "/files/code.py",                  # not a kind of file the viewer serves
    "/files/plots/%00.png",
])
def test_files_outside_the_results_are_refused(eval_client: TestClient, url: str) -> None:
    response = eval_client.get(url)
    assert response.status_code in (403, 404)
    assert "not for the browser" not in response.text and "root:" not in response.text
    assert response.json()["error"]


def test_files_of_the_evaluation_are_served(eval_client: TestClient) -> None:
    assert eval_client.get("/files/plots/iou_histogram.png").headers["content-type"] == "image/png"
    report = eval_client.get("/files/report.md")
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/plain")


def test_a_jsonl_result_serves_no_files(client: TestClient, results_jsonl: Path) -> None:
    assert client.get(f"/files/{results_jsonl.name}").status_code == 404


def test_host_header_is_checked_on_loopback(results_jsonl: Path, tmp_path: Path) -> None:
    app = create_app(results_jsonl, model=_unused_model, cache_dir=tmp_path / "cache", allowed_hosts=LOOPBACK_HOSTS)
    assert TestClient(app, base_url="http://127.0.0.1:8765").get("/api/info").status_code == 200
    assert TestClient(app, base_url="http://localhost:8765").get("/api/info").status_code == 200
    assert TestClient(app, base_url="http://[::1]:8765").get("/api/info").status_code == 200
    refused = TestClient(app, base_url="http://rebound.example:8765").get("/api/info")
    assert refused.status_code == 400 and "host" in refused.json()["error"]


def test_a_loopback_address_given_is_accepted_as_host(results_jsonl: Path, monkeypatch) -> None:
    import uvicorn

    import neuroloc.viewer.app
    from neuroloc.cli import main

    given: dict = {}
    real_create_app = neuroloc.viewer.app.create_app

    def recording(*args, **kwargs):
        given.update(kwargs)
        return real_create_app(*args, **kwargs)

    monkeypatch.setattr(neuroloc.viewer.app, "create_app", recording)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)  # started, not served
    result = CliRunner().invoke(main, ["view", str(results_jsonl), "--no-browser", "--host", "127.0.0.2", "--port", "0"])
    assert result.exit_code == 0, result.output
    assert "127.0.0.2" in given["allowed_hosts"] and "localhost" in given["allowed_hosts"]


def test_a_model_that_names_nothing_is_refused_before_serving(results_jsonl: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from neuroloc.cli import main

    served: list[bool] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: served.append(True))
    result = CliRunner().invoke(main, ["view", str(results_jsonl), "--no-browser", "--port", "0", "-m", "nosuch"])
    assert result.exit_code == 2 and "'--model'" in result.output and "nosuch" in result.output and not served, result.output


def test_other_web_sites_cannot_use_the_api_but_may_link_to_the_pages(client: TestClient) -> None:
    foreign = {"sec-fetch-site": "cross-site", "sec-fetch-mode": "no-cors"}
    refused = client.get("/api/items/1/explain", headers=foreign)
    assert refused.status_code == 403 and "other web sites" in refused.json()["error"]
    assert client.get("/api/items", headers={"origin": "http://evil.example"}).status_code == 403
    assert client.get("/api/items/1/thumb", headers={"sec-fetch-site": "same-site"}).status_code == 403
    assert client.get("/", headers={"sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate"}).status_code == 200
    assert client.get("/api/items", headers={"sec-fetch-site": "same-origin"}).status_code == 200
    assert client.get("/api/items", headers={"origin": "http://testserver"}).status_code == 200


def test_numbers_too_large_for_sqlite_are_a_json_4xx(client: TestClient) -> None:
    huge = "9" * 25
    for url, params in (("/api/items", {"offset": huge}), ("/api/items", {"label": huge})):
        response = client.get(url, params=params)
        assert response.status_code == 400 and "too large" in response.json()["error"]
    for url in (f"/api/items/{huge}", f"/api/items/{huge}/thumb", f"/api/items/{huge}/explain"):
        assert client.get(url).status_code == 404


def test_a_cache_folder_that_cannot_be_written_is_a_json_error(results_jsonl: Path, tmp_path: Path) -> None:
    blocked = tmp_path / "a file, not a folder"
    blocked.write_text("")
    client = TestClient(create_app(results_jsonl, model=_unused_model, cache_dir=blocked))
    response = client.get("/api/items/1/thumb")
    assert response.status_code == 500 and "cache folder" in response.json()["error"]


def test_the_model_is_loaded_once_when_requests_arrive_together() -> None:
    import threading

    from neuroloc.viewer.compute import Explainer

    loads = []

    def slow_loader():
        loads.append(1)
        time.sleep(0.2)
        return object()

    explainer = Explainer(slow_loader)
    threads = [threading.Thread(target=lambda: explainer.model) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loads) == 1


def test_results_of_a_model_that_is_not_loaded_from_them_get_a_warning(tmp_path: Path, pictures: list[Path]) -> None:
    results = tmp_path / "custom.jsonl"
    results.write_text(json.dumps({**_record(0, str(pictures[0]), (64, 48)), "model": "mypkg.models:factory"}) + "\n")
    info = TestClient(create_app(results, cache_dir=tmp_path / "cache")).get("/api/info").json()
    assert any("'mypkg.models:factory'" in w and "--model" in w for w in info["warnings"])
    assert info["model"] == "efficientnet_lite0"


def test_a_localize_runs_settings_start_the_knobs_and_name_what_the_viewer_lacks(results_jsonl: Path,
                                                                                  tmp_path: Path) -> None:
    from neuroloc.config import PRESETS
    from neuroloc.jsonl import settings_path

    config = PRESETS["paper"].with_options(kmax=20).to_dict()
    settings_path(results_jsonl).write_text(json.dumps({"model": "efficientnet_lite0", "intensity": "stretch",
                                                        "config": config, "directions": "auto"}), encoding="utf-8")
    client = TestClient(create_app(results_jsonl, model="efficientnet_lite0", cache_dir=tmp_path / "cache"))
    warnings = client.get("/api/info").json()["warnings"]
    assert any("were localized with feature directions" in w and "--directions FILE" in w for w in warnings)
    few = tmp_path / "few.jsonl"  # auto over fewer than 20 images fits nothing: nothing to warn of
    few.write_text("".join(results_jsonl.read_text().splitlines(keepends=True)[:5]), encoding="utf-8")
    settings_path(few).write_text(settings_path(results_jsonl).read_text(), encoding="utf-8")
    small = TestClient(create_app(few, model="efficientnet_lite0", cache_dir=tmp_path / "cache"))
    assert not [w for w in small.get("/api/info").json()["warnings"] if "directions" in w]
    tiled = json.loads(settings_path(few).read_text(encoding="utf-8")) | {"multi": {"tiles": {"size": 120}}}
    settings_path(few).write_text(json.dumps(tiled), encoding="utf-8")  # fitted over tiles: a few images suffice
    tiles = TestClient(create_app(few, model="efficientnet_lite0", cache_dir=tmp_path / "cache"))
    assert [w for w in tiles.get("/api/info").json()["warnings"] if "were localized with feature directions" in w]
    assert any("--intensity stretch, the viewer with range" in w for w in warnings)
    assert client.get("/api/items/1").json()["suggested_knobs"] == {"preset": "paper", "kmax": 20}
    told = TestClient(create_app(results_jsonl, model="efficientnet_lite0", cache_dir=tmp_path / "cache",
                                 directions=object(), intensity="stretch"))
    assert not [w for w in told.get("/api/info").json()["warnings"] if "directions" in w or "intensity" in w]


# --- evaluation folders -------------------------------------------------------------------------------------


def test_evaluation_folder_serves_metrics_plots_and_cases(eval_client: TestClient, evaluation: Path) -> None:
    info = eval_client.get("/api/info").json()
    assert info["mode"] == "evaluation"
    assert [s["name"] for s in info["sources"]] == ["center", "dam"]  # the metrics table's order
    assert info["dataset"] and info["warnings"] == []
    metrics = eval_client.get("/api/metrics").json()
    assert metrics["methods"]["dam"]["gt_known"] == 40.0
    assert metrics["run"]["images"] == 5
    assert ["gt_known", "GT-known loc"] in metrics["columns"]
    assert metrics["plots"] == ["/files/plots/iou_histogram.png"]
    assert metrics["report"] == "/files/report.md" and metrics["per_class"] == "/files/per_class.csv"
    assert "tench" in eval_client.get(metrics["per_class"]).text
    assert eval_client.get(metrics["plots"][0]).status_code == 200
    cases = eval_client.get("/api/cases", params={"source": "dam", "n": 2}).json()
    assert [round(c["iou"], 3) for c in cases["best"]] == [1.0, 0.5]
    assert [round(c["iou"], 4) for c in cases["worst"]] == [round(100 / 1900, 4), round(100 / 1600, 4)]
    best = eval_client.get(f"/api/items/{cases['best'][0]['id']}").json()
    assert best["gt"] == [[0.0, 0.0, 40.0, 40.0]] and best["suggested_knobs"] == {"preset": "paper", "kmax": 20}


def test_evaluation_items_have_ground_truth_and_iou(eval_client: TestClient) -> None:
    items = eval_client.get("/api/items", params={"source": "dam", "sort": "iou", "order": "desc"}).json()["items"]
    assert [round(i["iou"], 4) for i in items] == [1.0, 0.5, 0.25, round(100 / 1600, 4), round(100 / 1900, 4)]
    assert all(i["gt"] == [[0.0, 0.0, 40.0, 40.0]] for i in items)
    misses = eval_client.get("/api/items", params={"source": "dam", "status": "miss"}).json()
    assert misses["total"] == 3
    wrong = eval_client.get("/api/items", params={"source": "dam", "status": "wrong_class"}).json()
    assert wrong["total"] == 1 and wrong["items"][0]["correct"] is False
    ranged = eval_client.get("/api/items", params={"source": "dam", "min_iou": 0.2, "max_iou": 0.9}).json()
    assert ranged["total"] == 2
    summary = eval_client.get("/api/summary", params={"source": "center"}).json()
    assert summary["has_iou"] and summary["misses"] == 5 and summary["suggested_knobs"] == {"preset": "default"}
    assert not summary["has_confidence"]


def test_evaluation_items_are_sorted_and_filtered_by_confidence(eval_client: TestClient) -> None:
    assert eval_client.get("/api/summary", params={"source": "dam"}).json()["has_confidence"]
    known = sorted(c for c in EVAL_CONFIDENCE if c is not None)
    for order in ("asc", "desc"):
        items = eval_client.get("/api/items", params={"source": "dam", "sort": "confidence", "order": order}).json()["items"]
        assert [i["confidence"] for i in items] == (known if order == "asc" else known[::-1]) + [None]
    least = eval_client.get("/api/items", params={"source": "dam", "sort": "confidence", "limit": 1}).json()["items"][0]
    assert least["confidence"] == 0.1 and round(least["iou"], 4) == round(100 / 1900, 4)  # the worst box, first
    confident = eval_client.get("/api/items", params={"source": "dam", "min_confidence": 0.5}).json()
    assert confident["total"] == 2 and {i["confidence"] for i in confident["items"]} == {0.9, 0.6}
    center = eval_client.get("/api/items", params={"source": "center", "sort": "confidence"}).json()["items"]
    assert [i["confidence"] for i in center] == [None] * 5


def test_evaluation_files_edited_into_other_shapes_are_read_as_far_as_they_make_sense(evaluation: Path, tmp_path: Path) -> None:
    (evaluation / "dam" / "method.json").write_text('{"method": "dam", "density_layers": [1, 2]}')
    odd = TestClient(create_app(evaluation, model=_unused_model, cache_dir=tmp_path / "cache"))
    assert odd.get("/api/summary", params={"source": "dam"}).json()["suggested_knobs"]["density_layers"] == "1,2"
    (evaluation / "plots" / "a#b.png").write_bytes(b"\x89PNG")
    assert "/files/plots/a%23b.png" in odd.get("/api/metrics").json()["plots"]
    (evaluation / "dam" / "method.json").write_text("5")
    metrics = json.loads((evaluation / "metrics.json").read_text())
    (evaluation / "metrics.json").write_text(json.dumps({**metrics, "run": "x", "methods": ["dam"]}))
    client = TestClient(create_app(evaluation, model=_unused_model, cache_dir=tmp_path / "cache2"))
    assert client.get("/api/summary", params={"source": "dam"}).json()["suggested_knobs"] == {"preset": "default"}
    assert client.get("/api/items/1").status_code == 200


def test_jsonl_mode_has_no_metrics(client: TestClient) -> None:
    assert client.get("/api/metrics").status_code == 404


def test_suggested_knobs_follow_method_settings() -> None:
    from neuroloc.config import PRESETS

    assert suggest_knobs(None) == {"preset": "default"}
    assert suggest_knobs({"method": "gradcam"}) == {"preset": "default"}
    fast = {"method": "dam", **PRESETS["fast"].with_options(level=0.4).to_dict()}
    assert suggest_knobs(fast) == {"preset": "fast", "level": 0.4}
    refined = {"method": "dam", **PRESETS["default"].with_options(refine="grabcut").to_dict()}
    assert suggest_knobs(refined) == {"preset": "default", "refine": "grabcut"}  # an evaluate run of dam::refine=grabcut
    assert settings_beyond_knobs(fast) == settings_beyond_knobs({"method": "gradcam"}) == {}
    leveled = json.loads(json.dumps({"method": "dam", **PRESETS["default"].with_options(level=0.4).to_dict()}, default=str))
    assert settings_beyond_knobs(leveled) == {}  # the level knob sets the fraction cut itself, as --level does
    wide = json.loads(json.dumps({"method": "dam", **PRESETS["paper"].with_options(kmax=100).to_dict()}, default=str))
    assert settings_beyond_knobs(wide) == {}  # beyond the knobs' limit (kmax 64): no error, the page still shows
    both = json.loads(json.dumps({"method": "dam", **PRESETS["default"].with_options(level=0.4, kmax=100).to_dict()},
                                 default=str))
    assert settings_beyond_knobs(both) == {}  # the level knob still sets the fraction cut
    massed = json.loads(json.dumps({"method": "dam", **PRESETS["default"].with_options(mass=0.8).to_dict()}, default=str))
    assert settings_beyond_knobs(massed)["mass"] == 0.8  # the page says the recompute cannot set it
    from neuroloc.config import preset_for
    from neuroloc.models import get_spec

    own = get_spec("squeezenet1_1").default_options  # a backbone's own default settings: what the viewer uses
    assert own, "squeezenet1_1 has settings of its own"
    squeezed = json.loads(json.dumps({"method": "dam", **preset_for("default", own).to_dict()}, default=str))
    assert suggest_knobs(squeezed, own) == {"preset": "default"} and settings_beyond_knobs(squeezed, own) == {}


# --- uploads ------------------------------------------------------------------------------------------------

UPLOAD = {"X-Neuroloc": "1"}


def _png(size: tuple[int, int] = (96, 72)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (90, 140, 60)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("data, message", [
    (b"this is not an image", "not an image file"),
    (b"", "empty file"),
    (_png()[:60], "cannot decode image"),
])
def test_bad_uploads_get_a_clear_4xx(client: TestClient, data: bytes, message: str) -> None:
    response = client.post("/api/upload", files={"file": ("photo<1>.png", data, "image/png")}, headers=UPLOAD)
    assert response.status_code == 400
    error = response.json()["error"]
    assert message in error and error.startswith("photo<1>.png")  # the name the user gave, not a temp path


def test_oversized_uploads_are_refused(results_jsonl: Path, tmp_path: Path) -> None:
    small = TestClient(create_app(results_jsonl, model=_unused_model, cache_dir=tmp_path / "c", max_upload_bytes=1000))
    data = _png((300, 300)) + b"\0" * 2000
    response = small.post("/api/upload", files={"file": ("big.png", data, "image/png")}, headers=UPLOAD)
    assert response.status_code == 413 and "limit" in response.json()["error"]
    raw = small.post("/api/upload", content=b"\0" * 200_000, headers={**UPLOAD, "content-type": "application/octet-stream"})
    assert raw.status_code == 413
    assert not list((tmp_path / "c").rglob("*.img"))  # nothing kept


def test_uploads_need_the_viewer_header(client: TestClient) -> None:
    response = client.post("/api/upload", files={"file": ("a.png", _png(), "image/png")})
    assert response.status_code == 403  # a form on another site cannot set the header


def test_an_upload_sent_again_takes_the_new_name_and_result_and_refused_ones_are_not_kept(
    results_jsonl: Path, tmp_path: Path, lite0
) -> None:
    client = TestClient(create_app(results_jsonl, model=lite0, cache_dir=tmp_path / "cache"))
    first = client.post("/api/upload", files={"file": ("first.png", _png(), "image/png")}, headers=UPLOAD).json()
    second = client.post("/api/upload?preset=paper&kmax=3&k=2&rescoring=none",
                         files={"file": ("second.png", _png(), "image/png")}, headers=UPLOAD).json()
    assert second["id"] == first["id"] and second["url"].startswith(f"/item/{first['id']}?")
    assert "preset=paper" in second["url"] and "kmax=3" in second["url"]  # the item page recomputes the same
    (item,) = client.get("/api/items", params={"source": "upload"}).json()["items"]
    assert item["name"] == "second.png" and item["boxes"][0]["box"] == second["result"]["box"]
    assert client.get(f"/api/items/{first['id']}").json()["record"]["upload_name"] == "second.png"
    kept = sorted((tmp_path / "cache" / "uploads").iterdir())
    refused = client.post("/api/upload?cls=no+such+class", files={"file": ("other.png", _png((50, 40)), "image/png")},
                          headers=UPLOAD)
    assert refused.status_code == 400 and sorted((tmp_path / "cache" / "uploads").iterdir()) == kept


def test_upload_and_explain_with_the_real_model(results_jsonl: Path, tmp_path: Path, lite0) -> None:
    client = TestClient(create_app(results_jsonl, model=lite0, cache_dir=tmp_path / "cache"))
    response = client.post("/api/upload", files={"file": ("field.png", _png(), "image/png")}, headers=UPLOAD)
    assert response.status_code == 200, response.text
    uploaded = response.json()
    x0, y0, x1, y1 = uploaded["result"]["box"]
    assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 72
    px, py = uploaded["result"]["point"]
    assert x0 <= px <= x1 and y0 <= py <= y1
    confidence, parts = uploaded["result"]["confidence"], uploaded["result"]["confidence_parts"]
    assert 0 <= confidence <= 1 and set(parts) == {"stability", "concentration", "agreement"}
    assert uploaded["url"] == f"/item/{uploaded['id']}"
    assert len(uploaded["result"]["top5"]) == 5
    listed = client.get("/api/items", params={"source": "upload"}).json()
    assert listed["total"] == 1 and listed["items"][0]["name"] == "field.png"
    assert listed["items"][0]["confidence"] == confidence  # the upload is indexed with its confidence
    assert client.get(f"/api/items/{uploaded['id']}").json()["record"]["predictions"][0]["confidence_parts"] == parts
    assert client.get(f"/api/items/{uploaded['id']}").json()["boxes"][0]["point"] == [px, py]
    for url in [uploaded["pictures"]["mask"], uploaded["pictures"]["density"], uploaded["pictures"]["maps"][0],
                uploaded["pictures"]["blobs"][-1]]:
        picture = client.get(url)
        assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    again = client.get(f"/api/items/{uploaded['id']}/explain").json()  # default class and knobs: cached
    assert again["key"] == uploaded["key"]
    # another class by name, and other knobs: recomputed
    changed = client.get(f"/api/items/{uploaded['id']}/explain",
                         params={"cls": "tabby", "preset": "paper", "kmax": 3, "rescoring": "none"}).json()
    assert changed["result"]["label"] == 281 and changed["result"]["mode"] == "neurons"
    assert changed["result"]["config"]["k"] == 3 and len(changed["result"]["neurons"]) == 3
    assert changed["pictures"]["density"] is None
    ambiguous = client.get(f"/api/items/{uploaded['id']}/explain", params={"cls": "terrier"})
    assert ambiguous.status_code == 400 and "terrier" in ambiguous.json()["error"]
    bad_layer = client.get(f"/api/items/{uploaded['id']}/explain", params={"layer": "no_such_layer"})
    assert bad_layer.status_code == 400 and "no_such_layer" in bad_layer.json()["error"]
    bad_knob = client.get(f"/api/items/{uploaded['id']}/explain", params={"k": 9, "kmax": 3, "preset": "paper"})
    assert bad_knob.status_code == 400 and "k must be" in bad_knob.json()["error"]
    votes_only = client.get(f"/api/items/{uploaded['id']}/explain", params={"similarity": 0}).json()
    assert votes_only["result"]["config"]["similarity"] == 0 and votes_only["key"] != uploaded["key"]
    negative = client.get(f"/api/items/{uploaded['id']}/explain", params={"similarity": -1})
    assert negative.status_code == 400 and "similarity" in negative.json()["error"]
    try:
        import cv2  # noqa: F401
    except ImportError:
        pass
    else:  # the refine knob reaches the pipeline and is part of the cache key
        refined = client.get(f"/api/items/{uploaded['id']}/explain", params={"refine": "grabcut"}).json()
        assert refined["result"]["config"]["refine"] == "grabcut" and refined["key"] != uploaded["key"]
    bad_refine = client.get(f"/api/items/{uploaded['id']}/explain", params={"refine": "grabcut", "preset": "paper"})
    assert bad_refine.status_code == 400 and "density" in bad_refine.json()["error"]
    missing = client.get("/api/items/2/explain")  # an item whose line is an error: image p1.png exists
    assert missing.status_code in (200, 422)
    key = uploaded["key"]
    for name in ("map\u00b2", "map00", "blob01", "map99999", "mapx"):  # one spelling per picture; others are none
        assert client.get(f"/api/explain/{key}/{name}").status_code == 404, name
    first = client.get("/api/items/1/explain")
    restarted = TestClient(create_app(results_jsonl, model=lite0, cache_dir=tmp_path / "cache"))
    again_there = restarted.get("/api/items/1/explain")
    assert first.status_code == again_there.status_code == 200
    assert first.json()["key"] != again_there.json()["key"]  # a new server's own addresses (another model maybe)


# --- command line -------------------------------------------------------------------------------------------


def test_view_is_a_command() -> None:
    from neuroloc.cli import main

    result = CliRunner().invoke(main, ["view", "--help"])
    assert result.exit_code == 0 and "--no-browser" in result.output and "127.0.0.1" in result.output


def test_view_without_the_extra_prints_the_pip_command(monkeypatch, results_jsonl: Path) -> None:
    from neuroloc.cli import main
    from neuroloc.viewer import command

    monkeypatch.setattr(command, "missing_dependencies", lambda: ["starlette", "uvicorn"])
    result = CliRunner().invoke(main, ["view", str(results_jsonl), "--no-browser"])
    assert result.exit_code == 1
    assert 'pip install "neuroloc[view]"' in result.output


def test_view_of_a_file_without_results_says_so(tmp_path: Path, monkeypatch) -> None:
    import uvicorn

    from neuroloc.cli import main

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)  # started, not served
    (tmp_path / "notes.jsonl").write_text("\n")
    result = CliRunner().invoke(main, ["view", str(tmp_path / "notes.jsonl"), "--no-browser", "--port", "0"])
    assert result.exit_code == 0 and "holds no localization lines" in result.output, result.output


def test_view_refuses_a_folder_that_is_not_an_evaluation(tmp_path: Path) -> None:
    from neuroloc.cli import main

    result = CliRunner().invoke(main, ["view", str(tmp_path), "--no-browser"])
    assert result.exit_code == 1 and "not an evaluate output folder" in result.output


# --- scale --------------------------------------------------------------------------------------------------


def test_100k_results_start_and_page_quickly(tmp_path: Path, pictures: list[Path]) -> None:
    """Start-up indexes the file once; a page is an index walk. Bounds are loose: the machine may be busy."""
    path = tmp_path / "big.jsonl"
    neurons = [{"channel": j, "y": 3, "x": 4, "dam_score": 0.1, "region_score": None, "blob_fraction": 0.0,
                "kept": True} for j in range(10)]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(100_000):
            cls = CLASSES[i % 1000]
            f.write(json.dumps({
                "image": f"imgs/img_{i:06d}.jpg", "width": 500, "height": 375, "model": "efficientnet_lite0",
                "predictions": [{"label": cls.index, "synset": cls.synset, "name": cls.name, "score": (i * 7919 % 10007) / 10007,
                                 "box": [10.0, 20.0, 300.0, 200.0], "layer": "_blocks.10", "empty": False, "neurons": neurons}],
                "error": None}) + "\n")
    began = time.perf_counter()
    index = load_results(path)
    client = TestClient(create_app(index, model=_unused_model, cache_dir=tmp_path / "cache"))
    started = time.perf_counter() - began
    timings = {}
    for name, params in {"first": {}, "by score": {"sort": "score", "order": "desc"},
                         "deep": {"sort": "class", "offset": 90_000}, "one class": {"label": 281, "sort": "score"},
                         "search": {"q": "tabby"}}.items():
        t = time.perf_counter()
        page = client.get("/api/items", params={"limit": 60, **params}).json()
        timings[name] = time.perf_counter() - t
        assert page["items"]
    print(f"\n100k results: start-up {started:.2f} s; pages " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in timings.items()))
    assert page["total"] == 100
    assert started < 60 and max(timings.values()) < 10


def test_a_level_knob_means_the_fixed_fraction_cut() -> None:
    from neuroloc.viewer.compute import build_config

    assert build_config("default", {}).cut == "otsu"
    config = build_config("default", {"level": 0.4})
    assert (config.cut, config.level) == ("fraction", 0.4)
    assert build_config("default", {"similarity": 0.0}).similarity == 0.0


def test_the_refine_knob_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from neuroloc.viewer.compute import ComputeError, build_config, parse_knobs

    assert parse_knobs({"refine": "grabcut"}) == ("default", {"refine": "grabcut"})
    with pytest.raises(ComputeError, match="refine must be one of"):
        parse_knobs({"refine": "watershed"})
    with pytest.raises(ComputeError, match="needs mode='density'"):
        build_config("paper", {"refine": "grabcut"})
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(ComputeError, match="pip install opencv-python-headless"):
        build_config("default", {"refine": "grabcut"})


def test_the_viewer_uses_feature_directions_it_is_given(results_jsonl: Path, tmp_path: Path, lite0) -> None:
    import torch

    from neuroloc.directions import FeatureDirections

    generator = torch.Generator().manual_seed(0)
    sizes = {"_blocks.10": 112, "_blocks.14": 192}
    directions = FeatureDirections(
        "efficientnet_lite0",
        {n: torch.zeros(c) for n, c in sizes.items()},
        {n: torch.nn.functional.normalize(torch.randn(c, generator=generator), dim=0) for n, c in sizes.items()},
        20,
    )
    answers = {}
    for given in (None, directions):
        client = TestClient(create_app(results_jsonl, model=lite0, cache_dir=tmp_path / f"c{given is None}", directions=given))
        response = client.post("/api/upload", files={"file": ("field.png", _png(), "image/png")}, headers=UPLOAD)
        assert response.status_code == 200, response.text
        answers[given is None] = response.json()["result"]
    assert answers[True]["directions"] is None
    assert answers[False]["directions"] == directions.fingerprint
    paper = TestClient(create_app(results_jsonl, model=lite0, cache_dir=tmp_path / "p", directions=directions))
    uploaded = paper.post("/api/upload", files={"file": ("field.png", _png(), "image/png")}, headers=UPLOAD).json()
    explained = paper.get(f"/api/items/{uploaded['id']}/explain", params={"preset": "paper"}).json()
    assert explained["result"]["directions"] is None  # the paper's recipe has no objectness map


def test_points_are_passed_on_only_when_they_are_two_finite_numbers() -> None:
    from neuroloc.viewer.index import _boxes

    box = [0.0, 0.0, 10.0, 10.0]
    predictions = [{"box": box, "point": [4, 5.5]}, {"box": box, "point": ["a", 1]}, {"box": box},
                   {"box": box, "point": [1.0, float("nan")]}, {"box": box, "point": [1.0, 2.0, 3.0]}, {"box": box, "point": [True, 1]}]
    assert [b["point"] for b in _boxes({"predictions": predictions})] == [[4.0, 5.5], None, None, None, None, None]


def test_thumbnails_read_deep_images_as_the_viewer_was_told(tmp_path: Path) -> None:
    import numpy as np

    from neuroloc.viewer.images import ThumbnailCache

    path = tmp_path / "deep.png"
    Image.fromarray(np.linspace(0, 4095, 64 * 48).reshape(48, 64).astype(np.uint16)).save(path)
    ranged, stretched = ThumbnailCache(tmp_path), ThumbnailCache(tmp_path, "stretch")
    assert ranged.key(path, 160) != stretched.key(path, 160)
    assert np.asarray(Image.open(ranged.get(path, 160))).max() < 30
    assert np.asarray(Image.open(stretched.get(path, 160))).max() > 240


def test_metrics_of_an_older_evaluation_with_nan_are_served_as_null(evaluation: Path, tmp_path: Path) -> None:
    """Earlier versions wrote NaN (a size group without images) into metrics.json, which JSON responses refuse."""
    metrics = json.loads((evaluation / "metrics.json").read_text())
    metrics["methods"]["dam"]["gt_known_small"] = float("nan")
    (evaluation / "metrics.json").write_text(json.dumps(metrics))  # Python writes NaN
    client = TestClient(create_app(evaluation, model=_unused_model, cache_dir=tmp_path / "cache"))
    response = client.get("/api/metrics")
    assert response.status_code == 200 and response.json()["methods"]["dam"]["gt_known_small"] is None


def test_each_class_of_an_evaluated_image_shows_its_own_true_boxes(tmp_path: Path, pictures: list[Path]) -> None:
    """An image with boxes of two classes is two cases of `neuroloc evaluate`; each of its lines gets the
    boxes of its own class (the line's "key"), not the first class's."""
    from neuroloc.cli import main

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "a.png").write_bytes(pictures[0].read_bytes())
    (data / "boxes.csv").write_text("image,synset,label,xmin,ymin,xmax,ymax\n"
                                    "a.png,n02123045,281,0,0,30,30\na.png,n01443537,1,10,10,20,20\n")
    out = tmp_path / "eval"
    result = CliRunner().invoke(main, ["evaluate", str(data), "--method", "full", "--output", str(out)])
    assert result.exit_code == 0, result.output
    client = TestClient(create_app(out, model=_unused_model, cache_dir=tmp_path / "cache"))
    items = client.get("/api/items", params={"source": "full"}).json()["items"]
    assert sorted((i["label"], i["gt"][0]) for i in items) == [(1, [10.0, 10.0, 20.0, 20.0]), (281, [0.0, 0.0, 30.0, 30.0])]


def test_a_top1_line_of_an_image_of_several_classes_is_judged_against_its_predicted_class() -> None:
    """evaluate --predicted-class writes one line per image, without "key": the viewer takes the boxes of the
    predicted class when the image has it, as the metrics do."""
    from neuroloc.viewer.index import _row

    truths = {"d/a.jpg": (693, [[0.0, 0.0, 10.0, 10.0]]), "d/a.jpg#693": (693, [[0.0, 0.0, 10.0, 10.0]]),
              "d/a.jpg#472": (472, [[50.0, 50.0, 100.0, 100.0]])}
    record = {"image": "d/a.jpg", "width": 100, "height": 100, "top1": 472, "error": None,
              "predictions": [{"label": 472, "name": "canoe", "box": [50.0, 50.0, 100.0, 100.0], "score": 0.9}]}
    row = _row("dam", 0, 0, b"{}", record, truths)
    assert row[11] == 1.0 and row[12] == 1  # IoU with the canoe's box, and right
    keyed = _row("dam", 0, 0, b"{}", {**record, "key": "d/a.jpg#693"}, truths)  # GT-known: the line's own class
    assert keyed[11] == 0.0 and keyed[12] == 0

