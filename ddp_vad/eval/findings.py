"""What the numbers say: the label-efficiency curve, the protocol's guarantee, the method's published numbers and a
plain-words verdict computed from the runs (never written by hand)."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

GAN, SCRATCH, RANDOM = "GAN+LRCN", "LRCN", "Random+LRCN"
LEARNED = (GAN, SCRATCH, RANDOM)

# The method's Table 5 (block-level 10-fold CV, balanced UCSD Ped1 windows, window protocol).
PUBLISHED = {
    "LRCN": {"recall": 0.953, "precision": 0.786, "accuracy": 0.846, "f1": 0.861},
    "GAN+LRCN": {"recall": 0.970, "precision": 0.789, "accuracy": 0.855, "f1": 0.870},
}

PROTOCOL_GUARANTEES = {
    "leakfree": "leak-free: labelled clips are split into clip-grouped folds and the GAN pretrains only on the "
    "unlabelled normal clips, so no model trained for a fold (the GAN included) has seen any window of that fold's "
    "test clips; normal and anomalous test windows come from the same recordings.",
    "clip": "clip-grouped folds: no clip is on both sides of a fold, but a GAN pretrained on every window has seen "
    "the test clips (unlabelled), and normal windows may come from other recordings than the anomalies.",
    "window": "LEAKY (the method's protocol, kept to reproduce its Table 5): folds are drawn over windows, and "
    "neighbouring windows share 9 of 10 frames, so a near-copy of every test window is in the training folds. "
    "These numbers are optimistic and do not measure generalisation to new footage.",
}


def curve(entries: list[dict]) -> dict[str, dict[float, dict]]:
    """{method: {labelled fraction: entry}} over every cross-validated run (one entry per method and fraction)."""
    out: dict[str, dict[float, dict]] = defaultdict(dict)
    for e in entries:
        out[e["method"]].setdefault(float(e.get("labelled_fraction", 1.0)), e)
    return dict(out)


def curve_table(by_method: dict[str, dict[float, dict]], metric: str = "accuracy") -> list[str]:
    """Markdown: one row per method, one column per labelled fraction, ``mean ± std`` of ``metric`` over folds."""
    fractions = sorted({f for runs in by_method.values() for f in runs})
    lines = ["| Method | " + " | ".join(f"{f:g}" for f in fractions) + " |", "|---" * (len(fractions) + 1) + "|"]
    for method, runs in by_method.items():
        cells = []
        for f in fractions:
            e = runs.get(f)
            m = e["mean"][metric] if e else None
            cells.append("" if e is None else "n/a" if m is None else f"{m:.3f} ± {e['std'][metric]:.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _best_baseline(at_full: dict[str, dict], prefix: str | None) -> tuple[str, float] | None:
    pool = {m: e["mean"]["accuracy"] for m, e in at_full.items() if m not in LEARNED}
    pool = {m: a for m, a in pool.items() if a is not None and (prefix is None or m.startswith(prefix))}
    return max(pool.items(), key=lambda kv: kv[1]) if pool else None


def _share(fraction: float) -> str:
    return "with all labels" if fraction >= 1.0 else f"at {fraction:g} of the labels"


def verdict(by_method: dict[str, dict[float, dict]], protocol: str) -> str:
    """One paragraph: does GAN+LRCN beat LRCN at each labelled fraction, by how much, beyond the fold spread? And
    where do the classic and motion baselines stand at full labels? Accuracy over folds (balanced test folds)."""
    if GAN not in by_method or SCRATCH not in by_method:
        return "No verdict: the report needs both a GAN+LRCN and an LRCN run."
    parts, wins, clear = [], 0, 0
    shared = sorted(set(by_method[GAN]) & set(by_method[SCRATCH]))
    for f in shared:
        g, s = by_method[GAN][f], by_method[SCRATCH][f]
        ga, sa = g["mean"]["accuracy"], s["mean"]["accuracy"]
        if ga is None or sa is None:
            continue
        diff, spread = ga - sa, max(g["std"]["accuracy"] or 0.0, s["std"]["accuracy"] or 0.0)
        wins += diff > 0
        clear += abs(diff) > spread
        side = "above" if diff > 0 else "below" if diff < 0 else "level with"
        size = "larger" if abs(diff) > spread else "smaller"
        parts.append(f"{_share(f)} GAN+LRCN is {abs(diff):.3f} {side} LRCN ({ga:.3f} vs {sa:.3f}; "
                     f"{size} than the fold spread {spread:.3f})")  # fmt: skip
    if not parts:
        return "No verdict: GAN+LRCN and LRCN share no labelled fraction with defined accuracy."
    text = (f"Under the {protocol} protocol, GAN pretraining helps at {wins} of {len(parts)} labelled fractions, "
            f"and the difference exceeds the fold spread at {clear} of them: " + "; ".join(parts) + ".")  # fmt: skip
    at_full = {m: runs[1.0] for m, runs in by_method.items() if 1.0 in runs}
    gan_full = at_full.get(GAN, {}).get("mean", {}).get("accuracy")
    for name, prefix in (("classic pixel baseline", None), ("motion baseline", "motion-")):
        best = _best_baseline({m: e for m, e in at_full.items() if prefix or not m.startswith("motion-")}, prefix)
        if best and gan_full is not None:
            cmp = "beats" if gan_full > best[1] else "does not beat"
            text += f" With all labels, GAN+LRCN ({gan_full:.3f}) {cmp} the best {name} ({best[0]}, {best[1]:.3f})."
    if protocol == "window":
        text += " The window protocol leaks (see above): read these numbers as an upper bound."
    return text


def budgets(entries: list[dict]) -> list[str]:
    """Markdown lines: what each learned method was given (epochs, batch size, what was trained, whether its fold
    scores were calibrated on normal footage and carry the motion prior), once per method and budget, with the
    labelled fractions it was run at."""
    by_budget: dict[tuple, list[float]] = defaultdict(list)
    for e in entries:
        x = e.get("extra", {})
        if "epochs" in x:
            key = (e["method"], x["epochs"], x.get("batch_size", "?"), x.get("train", "?"), x.get("calibrate", "none"),
                   x.get("motion_prior", "none"), str(x.get("prior_share", 0.5)))  # fmt: skip
            by_budget[key].append(float(e.get("labelled_fraction", 1.0)))
    scored = {
        ("normal", "none"): ", each fold's scores calibrated on normal footage (`--calibrate normal`)",
        ("normal", "energy"): ", each fold's scores calibrated on normal footage with the motion prior "
        "(`--calibrate normal --motion-prior energy`)",
    }
    return [
        f"- {method}: {epochs} epochs, batch {batch}, trains {train}{scored.get((calibrate, prior), '')}"
        f"{_share_text(share) if prior == 'energy' else ''} "
        f"(labelled fractions {', '.join(f'{f:g}' for f in sorted(fractions))})"
        for (method, epochs, batch, train, calibrate, prior, share), fractions in sorted(by_budget.items())
    ]


def _share_text(share: str) -> str:
    """How the motion prior was weighed (``--prior-share``), for a budget line; nothing for the plain sum."""
    if share == "nested":
        return ", its share chosen per fold on inner folds of the training clips (`--prior-share nested`)"
    return "" if float(share) == 0.5 else f", its share {float(share):g} (`--prior-share {float(share):g}`)"


def published_dataset(dataset: str | None) -> str | None:
    """The published dataset a shard set's name (the manifest's ``dataset``) is: "UCSD Ped1" for ``UCSDped1``,
    "UCSD Ped2" for ``UCSDped2`` or a folder such as ``ucsd-ped2-videos``; None for anything else (the synthetic
    data, a user's videos), which no published figure describes."""
    from ddp_vad.eval.frame_scores import PUBLISHED_FRAME_AUROC

    squashed = re.sub(r"[^a-z0-9]", "", str(dataset or "").lower())
    return next((name for name in PUBLISHED_FRAME_AUROC if name.lower().replace(" ", "") in squashed), None)


def published_frame_auroc(dataset: str | None) -> dict[str, float]:
    """The published unsupervised frame AUROCs of ``dataset`` (see :func:`published_dataset`); {} when none."""
    from ddp_vad.eval.frame_scores import PUBLISHED_FRAME_AUROC

    return dict(PUBLISHED_FRAME_AUROC.get(published_dataset(dataset) or "", {}))


def published_rows(entries: list[dict], dataset: str | None) -> list[dict[str, Any]]:
    """The method's published Table 5 rows (UCSD Ped1, window protocol), beside our window-protocol rows on Ped1."""
    if published_dataset(dataset) != "UCSD Ped1" or not any(e["protocol"] == "window" for e in entries):
        return []
    return [{"method": f"{m} (published)", **v} for m, v in PUBLISHED.items()]


def paired_comparisons(by_method: dict[str, dict[float, dict]], frames_of: dict[str, Any]) -> list[dict]:
    """The paired frame-AUROC differences the verdict rests on (:func:`ddp_vad.eval.frame_scores.paired_difference`,
    ``frames_of``: run folder -> its frames): GAN+LRCN against LRCN and against the random-init control at every
    labelled fraction, and, with all labels, the best learned model against each motion baseline and the best
    pixel baseline."""
    from ddp_vad.eval.frame_scores import paired_difference

    def pair(a: str, b: str, f: float) -> dict | None:
        ea, eb = by_method.get(a, {}).get(f), by_method.get(b, {}).get(f)
        if ea is None or eb is None or ea["run"] not in frames_of or eb["run"] not in frames_of:
            return None
        d = paired_difference(frames_of[ea["run"]], frames_of[eb["run"]])
        return None if d is None else {"a": a, "b": b, "fraction": f, "a_value": ea["mean"].get("frame_auroc"),
                                       "b_value": eb["mean"].get("frame_auroc"), **d}  # fmt: skip

    out = []
    fractions = sorted({f for runs in by_method.values() for f in runs})
    for control in (SCRATCH, RANDOM):
        out += [p for f in fractions if (p := pair(GAN, control, f))]
    full = {m: runs[1.0] for m, runs in by_method.items() if 1.0 in runs and runs[1.0]["mean"].get("frame_auroc")}
    learned = [m for m in (GAN, SCRATCH) if m in full]
    if learned:
        best = max(learned, key=lambda m: full[m]["mean"]["frame_auroc"])
        pixel = [m for m in full if m not in LEARNED and not m.startswith("motion-")]
        rivals = sorted(m for m in full if m.startswith("motion-"))
        rivals += [max(pixel, key=lambda m: full[m]["mean"]["frame_auroc"])] if pixel else []
        out += [p for m in rivals if (p := pair(best, m, 1.0))]
    return out


def _call(c: dict) -> str:
    if c.get("borderline"):
        return "borderline: an interval end is within bootstrap noise of zero"
    if c["low"] > 0:
        return "better"
    if c["high"] < 0:
        return "worse"
    return "no detectable difference"


def _interval(c: dict) -> str:
    text = f"{c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]"
    if pooled_only(c):
        text += (f", but {c['per_fold_mean']:+.3f} ± {c['per_fold_std']:.3f} fold by fold: the pooled gap comes from "
                 "scores that are not on one scale across folds, not from ranking within a fold")  # fmt: skip
    return text


def pooled_only(c: dict) -> bool:
    """A pooled difference the folds do not show: the interval excludes zero while the mean per-fold difference is
    within one std of zero or of the other sign. Pooling frames of every fold rewards fold models whose scores
    share a scale (calibration), which a single deployed model needs too, but it is not better ranking."""
    m, sd = c.get("per_fold_mean"), c.get("per_fold_std")
    if m is None or sd is None or (c["low"] <= 0 <= c["high"]) or c.get("borderline"):
        return False
    return abs(m) <= sd or (m > 0) != (c["diff"] > 0)


def paired_verdict(comparisons: list[dict], protocol: str) -> str:
    """The verdict from paired frame-AUROC differences: "helps" only where the 95% interval excludes zero."""
    if not comparisons:
        return "No verdict: the report needs a GAN+LRCN run and a run to compare it with, with frame-level scores."
    c0 = comparisons[0]
    drawn, resamples = sorted({c["n_boot"] for c in comparisons if c.get("n_boot")}), ""
    if drawn:
        span = f"{drawn[0]:,}" + (f" to {drawn[-1]:,}" if len(drawn) > 1 else "")
        settled = all(c.get("settled") for c in comparisons)
        tail = (
            "enough for every interval end to settle within ±0.0005"
            if settled
            else "not every interval end settled within ±0.0005"
        )
        resamples = f" ({span} resamples, {tail})"
    text = [f"Under the {protocol} protocol, frame AUROC pooled over every frame of the {c0['n_clips']} labelled "
            f"clips ({c0['repeats']} repeat(s) of the cross-validation); differences are paired (the same frames, "
            f"the same folds) with a 95% bootstrap interval over clips{resamples}, and a "
            "method helps only where the interval lies above zero; \"borderline\" marks an interval end that other "
            "resamples could move across zero."]  # fmt: skip
    for control, name in ((SCRATCH, "LRCN from scratch"), (RANDOM, "the random-init control (Random+LRCN)")):
        rows = [c for c in comparisons if c["a"] == GAN and c["b"] == control]
        if not rows:
            continue
        calls = [_call(c) for c in rows]
        helps, hurts = calls.count("better"), calls.count("worse")
        close = sum(k.startswith("borderline") for k in calls)
        parts = [f"{_share(c['fraction'])} {_interval(c)} ({k})" for c, k in zip(rows, calls, strict=True)]
        level = len(rows) - helps - hurts - close
        tally = f"better at {helps}, worse at {hurts}, " + (f"borderline at {close}, " if close else "")
        text.append(f"GAN+LRCN vs {name}: {tally}no detectable difference at {level} of {len(rows)} labelled "
                    "fractions: " + "; ".join(parts) + ".")  # fmt: skip
    rivals = [c for c in comparisons if c["b"] not in LEARNED]
    if rivals:
        best = rivals[0]["a"]
        parts = [f"{c['b']} ({c['b_value']:.3f}): {_interval(c)} ({_call(c)})" for c in rivals]
        text.append(f"With all labels, the best learned model ({best}, frame AUROC {rivals[0]['a_value']:.3f}) "
                    "against " + "; ".join(parts) + ".")  # fmt: skip
    return " ".join(text)
