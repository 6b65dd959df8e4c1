"""Measuring precisely: even clip-grouped folds, repeats, frame-level numbers from frame labels, the paired verdict's
interval, the random-init control and the per-clip timelines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from ddp_vad.data.shards import ShardConfig, build_shards
from ddp_vad.data.synth import SynthConfig, run_synth
from ddp_vad.data.windows import grouped_stratified_folds
from ddp_vad.errors import UserError
from ddp_vad.eval.figures import fig_timelines
from ddp_vad.eval.frame_scores import RepeatFrames, frame_summary, frames_by_repeat, paired_difference
from ddp_vad.train.crossval import CVWindows, fold_split
from ddp_vad.train.metrics import read_oof_scores
from ddp_vad.train.transfer import TransferConfig, run_transfer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _clips(n_clips: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows of ``n_clips`` clips whose anomaly shares range from 0 to 0.9 (labels, clip id per window)."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for c in range(n_clips):
        n = int(rng.integers(150, 250))
        share = (c % 10) / 10
        labels.append((rng.random(n) < share).astype(np.int64))
        groups.append(np.full(n, c))
    return np.concatenate(labels), np.concatenate(groups)


def test_grouped_folds_are_even_seeded_and_never_split_a_clip():
    labels, groups = _clips(40, seed=1)
    overall = labels.mean()
    folds = {seed: grouped_stratified_folds(labels, groups, 5, seed) for seed in (0, 1)}
    for f in folds.values():
        assert sorted(set(f.tolist())) == [0, 1, 2, 3, 4]
        for g in np.unique(groups):
            assert np.unique(f[groups == g]).size == 1  # a clip lies in one fold
        rates = [labels[f == k].mean() for k in range(5)]
        assert max(abs(r - overall) for r in rates) < 0.06, rates  # every fold near the overall anomaly rate
        sizes = [int((f == k).sum()) for k in range(5)]
        assert max(sizes) < 1.35 * min(sizes), sizes
    assert not np.array_equal(folds[0], folds[1])  # the seed matters (repeats rely on it)
    assert np.array_equal(folds[0], grouped_stratified_folds(labels, groups, 5, 0))  # and decides everything
    assert (grouped_stratified_folds(labels, groups % 3, 5, 0) == -1).all()  # fewer clips than folds


def test_repeats_deal_new_clip_grouped_folds_over_the_same_windows():
    labels, groups = _clips(12, seed=2)
    clips = [f"Test{g:03d}" for g in groups]
    fold_of = grouped_stratified_folds(labels, groups, 4, 0)
    fold_of[:5] = -1  # windows outside the protocol's set stay outside in every repeat

    class WS:  # the parts of a WindowSet that CVWindows reads
        def __init__(self):
            self.labels, self.clips, self.keys, self.starts = labels, clips, [str(i) for i in labels], groups * 0
            self.manifest = {"seed": 0}

        def folds(self, protocol):
            return fold_of

    cv = CVWindows.from_window_set(WS(), "leakfree", 4, repeats=3)
    assert cv.n_units == 12 and cv.unit(5) == (1, 1)
    assert np.array_equal(cv.fold_sets[0], fold_of)  # repeat 0 keeps the shards' folds
    assert not np.array_equal(cv.fold_sets[1], cv.fold_sets[2])
    for r in range(3):
        assert (cv.fold_sets[r][:5] == -1).all() and (cv.fold_sets[r][5:] >= 0).all()
        tested = []
        for k in range(4):
            train, test, _ = fold_split(cv, r * 4 + k)
            assert not {clips[i] for i in train} & {clips[i] for i in test}
            assert not set(range(5)) & (set(train.tolist()) | set(test.tolist()))
            tested += test.tolist()
        assert sorted(tested) == list(range(5, len(labels)))  # each repeat tests every window once


def test_frame_numbers_come_from_frame_labels_not_window_labels():
    # One clip of 30 frames, frames 12..16 anomalous; window length 10, a window is anomalous from 5 frames on.
    truth = np.zeros(30, np.int64)
    truth[12:17] = 1
    rows, labels = [], {}
    for s in range(21):
        key = f"Test001_{s:04d}"
        fl = truth[s : s + 10].tolist()
        labels[key] = fl
        rows.append({"key": key, "clip": "Test001", "start": s, "label": int(sum(fl) >= 5), "score": sum(fl) / 10,
                     "fold": 0})  # fmt: skip
    by_repeat = frames_by_repeat(rows, labels)
    summary = frame_summary(by_repeat)
    assert summary["n_frames"] == 30 and summary["n_anomalous_frames"] == 5  # window labels would mark 10
    frame_score = [max(sum(truth[s : s + 10]) / 10 for s in range(max(0, t - 9), min(t, 20) + 1)) for t in range(30)]
    assert summary["frame_auroc"] == pytest.approx(roc_auc_score(truth, frame_score))
    assert summary["clip_auroc"] == pytest.approx(summary["frame_auroc"])  # one clip


def _frames(scores_of, n_clips=12, n=60, seed=0) -> dict[int, RepeatFrames]:
    rng = np.random.default_rng(seed)
    clips, frames, labels = [], [], []
    for c in range(n_clips):
        lab = np.zeros(n, np.int64)
        lab[20 : 20 + 5 + c] = 1
        clips += [f"c{c:02d}"] * n
        frames += list(range(n))
        labels.append(lab)
    labels = np.concatenate(labels)
    scores = scores_of(labels, rng)
    return {0: RepeatFrames(np.array(clips), np.array(frames), labels, scores, np.arange(len(labels)) % 4)}


def test_paired_difference_interval_says_better_worse_or_nothing():
    good = _frames(lambda y, rng: y + rng.normal(0, 0.7, y.size))
    poor = _frames(lambda y, rng: rng.normal(0, 1, y.size), seed=1)
    better = paired_difference(good, poor, n_boot=300)
    assert better["diff"] > 0.2 and 0 < better["low"] < better["diff"] < better["high"]
    worse = paired_difference(poor, good, n_boot=300)
    assert worse["high"] < 0 and worse["diff"] == pytest.approx(-better["diff"])
    same = paired_difference(good, good, n_boot=300)
    assert same["diff"] == 0 and same["low"] == same["high"] == 0
    noisy = _frames(lambda y, rng: y + rng.normal(0, 0.7, y.size), seed=2)
    close = paired_difference(good, noisy, n_boot=300)
    assert close["low"] < 0 < close["high"]  # two equally good models: the interval straddles zero
    assert close["n_clips"] == 12 and close["repeats"] == 1


def test_timeline_figure_shades_the_truth_and_draws_each_method():
    frames = np.arange(40)
    truth = ((frames >= 10) & (frames < 20)).astype(int)
    fig = fig_timelines({"Test003": {"frames": frames, "labels": truth,
                                     "scores": {"GAN+LRCN": frames / 40, "motion-gb": 1 - frames / 40}}})  # fmt: skip
    (ax,) = fig.axes
    assert "Test003" in ax.get_title() and ax.get_xlabel() == "frame"
    assert [line.get_label() for line in ax.get_lines()] == ["GAN+LRCN", "motion-gb"]
    (span,) = [p for p in ax.patches if p.get_label() == "ground truth: anomalous"]
    x0, x1 = sorted(span.get_transform().transform([[0, 0], [1, 0]])[:, 0])  # span in data units, via its path
    lo, hi = (ax.transData.inverted().transform([[x, 0]])[0, 0] for x in (x0, x1))
    assert lo == pytest.approx(9.5) and hi == pytest.approx(19.5)


@pytest.fixture(scope="module")
def leakfree_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("measure")
    data = run_synth(SynthConfig(out=str(root / "data"), train_clips=4, test_clips=6, frames=30, height=48, width=72,
                                 seed=5), show_progress=False)  # fmt: skip
    cfg = ShardConfig(data=str(data), out=str(root / "shards"), height=24, width=36, folds=3, workers=1, shard_size=32)
    return build_shards(cfg, show_progress=False)


def test_transfer_repeats_and_the_random_init_control(leakfree_shards, tmp_path):
    run = run_transfer(TransferConfig(shards=str(leakfree_shards), out=str(tmp_path / "r"), source="random",
                                      preset="tiny", epochs=1, batch_size=16, repeats=2, progress=False))  # fmt: skip
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == "Random+LRCN" and metrics["train"] == "head" and metrics["repeats"] == 2
    assert [(f["repeat"], f["fold"]) for f in metrics["folds"]] == [(r, k) for r in (0, 1) for k in range(3)]
    assert all({"window_auroc", "balanced_accuracy"} <= set(f) for f in metrics["folds"])
    oof = read_oof_scores(run)
    for r in (0, 1):
        rows = [o for o in oof if o["repeat"] == r]
        assert len({o["key"] for o in rows}) == len(rows) == len(oof) // 2  # every window once per repeat
        for k in range(3):
            assert not {o["clip"] for o in rows if o["fold"] == k} & {o["clip"] for o in rows if o["fold"] != k}
    # The control is one random LRCN for every fold (as one GAN serves every fold): the folds' frozen features match.
    from safetensors.torch import load_file

    states = [load_file(str(f)) for f in sorted((run / "folds").glob("fold_*/model.safetensors"))]
    assert len(states) == 6
    for name in (n for n in states[0] if n.startswith("features.")):
        assert all(torch.equal(states[0][name], st[name]) for st in states[1:]), name
    assert TransferConfig(shards=str(leakfree_shards), out=str(tmp_path / "d"), source="scratch").class_weight == (
        "balanced"  # the leak-free set is not balanced: the default loss weighs the classes
    )
    fold_of = [{o["key"]: o["fold"] for o in oof if o["repeat"] == r} for r in (0, 1)]
    assert fold_of[0] != fold_of[1]  # the second repeat dealt other folds
    with pytest.raises(UserError, match="--from random --train all"):
        TransferConfig(shards=str(leakfree_shards), out=str(tmp_path / "x"), source="random", train="all")
    with pytest.raises(UserError, match="--repeats"):
        TransferConfig(shards=str(leakfree_shards), out=str(tmp_path / "x"), source="scratch", repeats=0)


@pytest.mark.parametrize("cells", [1 << 22, 700])  # 700: the clip-by-clip matrix is built a clip at a time
def test_bootstrap_auroc_of_weighted_clips_equals_sklearn_on_the_resampled_frames(cells, monkeypatch):
    from ddp_vad.eval import frame_scores
    from ddp_vad.eval.frame_scores import _RankedScores

    monkeypatch.setattr(frame_scores, "_CELLS", cells)
    rng = np.random.default_rng(0)
    labels = (rng.random(500) < 0.4).astype(int)
    scores = np.round(labels + rng.normal(0, 1, 500), 1)  # rounded: many ties
    clip = rng.integers(0, 5, 500)
    weight = np.array([2.0, 0.0, 1.0, 1.0, 3.0])  # clip 4 drawn three times, clip 1 never
    idx = np.concatenate([np.flatnonzero(clip == c) for c in range(5) for _ in range(int(weight[c]))])
    ranked = _RankedScores(labels, scores, clip)
    assert ranked.auroc(weight) == pytest.approx(roc_auc_score(labels[idx], scores[idx]))
    assert ranked.auroc(np.ones(5)) == pytest.approx(roc_auc_score(labels, scores))
    many = rng.integers(0, 3, (50, 5)).astype(float)  # a batch of resamples at once, as the bootstrap draws them
    for w, value in zip(many, ranked.aurocs(many), strict=True):
        idx = np.concatenate([np.flatnonzero(clip == c) for c in range(5) for _ in range(int(w[c]))] + [[]]).astype(int)
        one_class = np.unique(labels[idx]).size < 2
        assert np.isnan(value) if one_class else value == pytest.approx(roc_auc_score(labels[idx], scores[idx]))
    assert _RankedScores(labels, scores, clip, n_clips=7).auroc(np.r_[weight, 5.0, 5.0]) == ranked.auroc(weight)


def test_a_pooled_gap_the_folds_do_not_show_is_named_in_the_verdict():
    from ddp_vad.eval.findings import paired_verdict, pooled_only

    calibrated = {"a": "GAN+LRCN", "b": "LRCN", "fraction": 0.1, "diff": 0.19, "low": 0.03, "high": 0.33,
                  "per_fold_mean": -0.003, "per_fold_std": 0.029, "n_clips": 12, "repeats": 1}  # fmt: skip
    ranked = {**calibrated, "per_fold_mean": 0.15, "per_fold_std": 0.04}
    assert pooled_only(calibrated) and not pooled_only(ranked)
    assert not pooled_only({**calibrated, "low": -0.01})  # no claim, nothing to qualify
    text = paired_verdict([calibrated], "leakfree")
    assert "+0.190 [+0.030, +0.330], but -0.003 ± 0.029 fold by fold" in text
    assert "fold by fold" not in paired_verdict([ranked], "leakfree")


def _fake_leakfree_run(shards: Path, run: Path, seed: int = 0) -> list[dict]:
    """A cross-validated run over every window of the labelled clips (as transfer writes one under leakfree), with
    seeded scores whose scale differs by fold (so pooled and per-fold window AUROCs differ)."""
    from ddp_vad.data.reader import iter_windows
    from ddp_vad.train.metrics import auroc, binary_metrics, write_cv_results

    rng = np.random.default_rng(seed)
    oof = [{"key": w["key"], "clip": w["meta"]["clip"], "start": w["meta"]["start"], "label": w["label"],
            "fold": w["meta"]["fold_leakfree"], "repeat": 0}
           for w in iter_windows(shards, "leakfree", frames=False)]  # fmt: skip
    for r in oof:
        r["score"] = float(np.clip(0.2 * r["label"] + rng.random() * 0.8 - 0.1 * r["fold"], 0.0, 1.0))
    folds = []
    for k in sorted({r["fold"] for r in oof}):
        y = [r["label"] for r in oof if r["fold"] == k]
        s = [r["score"] for r in oof if r["fold"] == k]
        folds.append({"fold": k, **binary_metrics(y, [int(v > 0.5) for v in s]), "window_auroc": auroc(y, s)})
    write_cv_results(run, "LRCN", "leakfree", folds, oof)
    (run / "config.json").write_text(json.dumps({"config": {"shards": str(shards)}}))
    return oof


def test_the_headline_counts_every_frame_of_the_labelled_clips(leakfree_shards, tmp_path):
    from ddp_vad.data.reader import iter_windows
    from ddp_vad.data.sources import open_dataset
    from ddp_vad.eval.report import EvaluateConfig, run_evaluate

    oof = _fake_leakfree_run(leakfree_shards, tmp_path / "run")
    manifest = json.loads((leakfree_shards / "manifest.json").read_text())
    truth = {c.name: c.frame_labels for c in open_dataset(manifest["source"]).clips if c.split == "test"}
    total = sum(len(v) for v in truth.values())
    window = manifest["window"]
    kept = {(w["meta"]["clip"], w["meta"]["start"] + t) for w in iter_windows(leakfree_shards, frames=False)
            for t in range(window) if w["meta"]["split"] == "test"}  # fmt: skip
    assert len(kept) < total  # the balanced set misses frames of the labelled clips: the test can tell them apart

    # Direct recomputation: a frame's score is the max over every window covering it, its label the dataset's.
    best: dict[tuple[str, int], float] = {}
    for r in oof:
        for t in range(window):
            best[(r["clip"], r["start"] + t)] = max(best.get((r["clip"], r["start"] + t), 0.0), r["score"])
    assert len(best) == total
    cells = sorted(best)
    expected = roc_auc_score([int(truth[c][f]) for c, f in cells], [best[c, f] for c, f in cells])

    out = tmp_path / "report"
    run_evaluate(EvaluateConfig(runs=(str(tmp_path / "run"),), out=str(out)))
    report = json.loads((out / "report.json").read_text())
    e = report["methods"]["LRCN"]
    assert e["frames"]["n_frames"] == e["frames"]["n_frames_labelled"] == total
    assert e["frames"]["n_clips_labelled"] == len(truth)
    assert e["frame_auroc"] == pytest.approx(expected)
    md = (out / "report.md").read_text()
    assert f"counts every one of the {total:,} frames of the {len(truth)} labelled clips" in md

    # One "window AUROC": the mean ± std over folds, in the headline and in Table 5 alike (not the pooled value).
    per_fold = [f["window_auroc"] for f in e["folds"]]
    cell = f"{np.mean(per_fold):.3f} ± {np.std(per_fold):.3f}"
    assert f"{e['window_auroc_pooled']:.3f}" != f"{np.mean(per_fold):.3f}"  # the two would show apart
    assert md.count(f"| {cell} |") == 2  # headline row and Table 5 row
    # Synthetic data: no published figures (those of UCSD Ped1 were printed on every dataset).
    assert report["published_frame_auroc"] == {} and "0.818" not in md and "No published figures" in md


def _two_models(seed: int = 0) -> tuple[dict[int, RepeatFrames], dict[int, RepeatFrames]]:
    """Two models on 12 clips of 200 frames (an anomaly from a random frame on, a per-clip offset both share),
    sized like the Ped1 sample; the first is somewhat better."""
    rng = np.random.default_rng(seed)
    clips = np.repeat([f"c{c:02d}" for c in range(12)], 200)
    frames = np.tile(np.arange(200), 12)
    labels = np.concatenate([(np.arange(200) >= rng.integers(20, 180)).astype(np.int64) for _ in range(12)])
    shared = np.repeat(rng.normal(0, 0.5, 12), 200)
    a = labels * 1.5 + shared + rng.normal(0, 1, labels.size)
    b = labels * 1.2 + shared + rng.normal(0, 1, labels.size)
    return ({0: RepeatFrames(clips, frames, labels, a, frames % 5)},
            {0: RepeatFrames(clips, frames, labels, b, frames % 5)})  # fmt: skip


def test_the_paired_interval_ends_do_not_move_with_the_bootstrap_seed():
    from ddp_vad.eval.frame_scores import END_TOLERANCE, N_BOOTSTRAP

    a, b = _two_models()
    runs = [paired_difference(a, b, seed=s) for s in range(4)]
    assert len({r["diff"] for r in runs}) == 1 and all(r["settled"] for r in runs)
    assert all(r["n_boot"] > N_BOOTSTRAP for r in runs)  # this pair needs more than the first 20,000 resamples
    for end in ("low", "high"):
        values = [r[end] for r in runs]
        assert max(values) - min(values) < 0.001, (end, values)  # 1,000 resamples: 0.002-0.005
        lo, hi = runs[0][f"{end}_range"]
        assert max(runs[0][end] - lo, hi - runs[0][end]) <= END_TOLERANCE
        assert all(lo <= v <= hi for v in values), (end, values, lo, hi)  # where the other seeds' ends land
    assert not runs[0]["borderline"] and runs[0]["low"] > 0
    fixed = paired_difference(a, b, n_boot=1000)
    assert fixed["n_boot"] == 1000 and not fixed["settled"]  # as many as asked for, and said to be unsettled


def test_an_interval_end_within_bootstrap_noise_of_zero_is_called_borderline():
    from ddp_vad.eval.findings import paired_verdict
    from ddp_vad.eval.frame_scores import interval_ends
    from ddp_vad.eval.markdown import _comparisons

    rng = np.random.default_rng(0)
    near = interval_ends(rng.normal(1.96 * 0.01, 0.01, 2000))  # the 2.5% quantile sits at zero
    assert near["low_range"][0] < 0 < near["low_range"][1]
    clear = interval_ends(rng.normal(0.05, 0.01, 2000))
    assert 0 < clear["low_range"][0] < clear["low"] < clear["low_range"][1] < clear["high"]

    row = {"a": "LRCN", "b": "motion-logreg", "fraction": 1.0, "diff": 0.05, "low": 0.0013, "high": 0.1,
           "low_range": [-0.0007, 0.003], "high_range": [0.09, 0.11], "borderline": True, "per_fold_mean": 0.05,
           "per_fold_std": 0.02, "n_clips": 12, "repeats": 1, "a_value": 0.8, "b_value": 0.75}  # fmt: skip
    gan = {**row, "a": "GAN+LRCN", "b": "LRCN"}
    text = paired_verdict([gan, row], "leakfree")
    assert "better at 0, worse at 0, borderline at 1, no detectable difference at 0 of 1" in text
    assert "+0.050 [+0.001, +0.100] (borderline" in text and "(better)" not in text
    (line,) = [x for x in _comparisons({"comparisons": [row]}) if x.startswith("| LRCN | motion-logreg")]
    assert line.endswith("| borderline (an interval end within bootstrap noise of zero) |")
