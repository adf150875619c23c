"""Stage calibration-report: claims, tables and headline metrics from the other stages' results.

Reads ``<results>/overlap/runs.json`` and ``<results>/fmnist/runs.json``; writes the
``<!-- results:start/end -->`` section of projects/calibration/README.md (every claim of the
design note with its verdict under the core claim rule, then the tables), the headline DVC
metrics ``<results>/metrics.json`` (``ece.<loss>.<calibrator>`` on the clean test set, ...),
``<results>/claims.json`` and the ECE-versus-overlap / -noise series as CSV plots.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.engine.config import entry_parser, parse_entry
from core.report.claims import Claim, paired_claim
from core.report.metrics import write_metrics
from core.report.stats import mean_std
from core.report.tables import fmt_mean_std, markdown_table
from core.utils.io import atomic_write_json, atomic_write_text, replace_marked_section
from projects.calibration.runs import run_name

DEFAULT_PARAMS = "projects/calibration/params.yaml"
AUTHORS_TS = "temperature_authors"  # fmnist_calibrate's cross-check column
README = "projects/calibration/README.md"


@dataclass(frozen=True)
class ClaimSpec:
    """A claim "``better`` beats ``worse``": per-seed ECE values of each side (seed order
    shared), from the paper ``source``."""

    key: str
    text: str
    source: str
    worse: Callable[[], list[float]]
    better: Callable[[], list[float]]


def key(x: float) -> str:
    """A number as a metrics key: 0.05 -> ``0_05``."""
    return f"{x:g}".replace(".", "_")


class Results:
    """Per-seed metric lookups over the two studies' ``runs.json``."""

    def __init__(self, overlap: dict, fmnist: dict, cfg: Mapping[str, Any]) -> None:
        self.overlap, self.fmnist, self.cfg = overlap, fmnist, cfg

    def fm(
        self, loss: str, cal: str, split: str = "test", metric: str = "ece", noise: float = 0.0
    ) -> list[float]:
        """``metric`` of (loss, calibrator, set) at ``noise``, one value per seed."""
        return [
            self.fmnist[run_name(loss, s, noise)][cal][split][metric] for s in self.cfg["seeds"]
        ]

    def ov(self, mean: float, method: str, metric: str = "ece") -> list[float]:
        """``metric`` of an overlap method (``erm``, ``erm+ts``, ...) at ``mean``, per draw."""
        return [r[metric] for r in self.overlap[f"{mean:g}"][method]]


def claim_specs(res: Results, params: Mapping[str, Any]) -> list[ClaimSpec]:
    """The design note's fixed list of claims (README, "Design"), in its order."""
    means = params["overlap"]["data"]["means"]
    low, high = max(means), min(means)  # least and most overlap
    top = max(params["fmnist"]["label_noise"]["rates"])
    c = max(params["fmnist"]["ood"]["severities"])
    cg = "Chidambaram & Ge 2024"
    specs = [
        ClaimSpec(
            "overlap_ts_degrades",
            f"ERM + TS: ECE at mean {high:g} above mean {low:g} (TS degrades with overlap)",
            cg,
            lambda: res.ov(high, "erm+ts"),
            lambda: res.ov(low, "erm+ts"),
        ),
        ClaimSpec(
            "overlap_mixup_ts",
            f"mixup + TS beats ERM + TS at mean {high:g}",
            cg,
            lambda: res.ov(high, "erm+ts"),
            lambda: res.ov(high, "mixup+ts"),
        ),
        ClaimSpec(
            "overlap_mixup",
            f"mixup (no TS) beats ERM + TS at mean {high:g}",
            cg,
            lambda: res.ov(high, "erm+ts"),
            lambda: res.ov(high, "mixup"),
        ),
        ClaimSpec(
            "overlap_mixup_ts_authors",
            f"cross-check, both with the authors' TS fit: mixup + TS beats ERM + TS at mean "
            f"{high:g}",
            cg + " (their code)",
            lambda: res.ov(high, "erm+ts_authors"),
            lambda: res.ov(high, "mixup+ts_authors"),
        ),
        ClaimSpec(
            "noise_ts_degrades",
            f"ERM + TS: ECE at noise {top:g} above noise 0 (TS degrades with overlap)",
            cg,
            lambda: res.fm("erm", "temperature", noise=top),
            lambda: res.fm("erm", "temperature"),
        ),
        ClaimSpec(
            "noise_mixup_ts",
            f"mixup + TS beats ERM + TS at noise {top:g}",
            cg,
            lambda: res.fm("erm", "temperature", noise=top),
            lambda: res.fm("mixup", "temperature", noise=top),
        ),
        ClaimSpec(
            "noise_mixup",
            f"mixup (no TS) beats ERM + TS at noise {top:g}",
            cg,
            lambda: res.fm("erm", "temperature", noise=top),
            lambda: res.fm("mixup", "none", noise=top),
        ),
        ClaimSpec(
            "noise_mixup_ts_authors",
            f"cross-check, both with the authors' TS fit: mixup + TS beats ERM + TS at noise "
            f"{top:g}",
            cg + " (their code)",
            lambda: res.fm("erm", AUTHORS_TS, noise=top),
            lambda: res.fm("mixup", AUTHORS_TS, noise=top),
        ),
    ]
    papers = {
        "temperature": "Guo et al. 2017",
        "vector": "Guo et al. 2017",
        "matrix": "Guo et al. 2017",
        "histogram_binning": "Zadrozny & Elkan 2001",
        "isotonic": "Zadrozny & Elkan 2002",
        "ca": "Liu et al. 2024",
        "ca_balanced": "Liu et al. 2024 (authors' code)",
    }
    for cal in params["fmnist"]["calibrators"]:
        specs.append(
            ClaimSpec(
                f"erm_{cal}",
                f"{cal} lowers ERM's clean ECE",
                papers.get(cal, cal),
                lambda cal=cal: res.fm("erm", "none"),
                lambda cal=cal: res.fm("erm", cal),
            )
        )
    train_time = {
        "label_smoothing": "Müller et al. 2019",
        "focal": "Mukhoti et al. 2020",
        "mixup": "Thulasidasan et al. 2019",
        "mrl": "Noh et al. 2023",
        "mndcg": "Noh et al. 2023",
    }
    for loss in params["fmnist"]["losses"]:
        if loss == "erm":
            continue
        specs.append(
            ClaimSpec(
                f"{loss}_raw",
                f"{loss} has a lower raw clean ECE than ERM",
                train_time.get(loss, loss),
                lambda loss=loss: res.fm("erm", "none"),
                lambda loss=loss: res.fm(loss, "none"),
            )
        )
    for loss in ("mrl", "mndcg"):
        specs.append(
            ClaimSpec(
                f"{loss}_vs_mixup",
                f"{loss} has a lower raw clean ECE than mixup",
                "Noh et al. 2023",
                lambda loss=loss: res.fm("mixup", "none"),
                lambda loss=loss: res.fm(loss, "none"),
            )
        )
    specs += [
        ClaimSpec(
            "focal_ts",
            "focal + TS beats ERM + TS (clean)",
            "Mukhoti et al. 2020",
            lambda: res.fm("erm", "temperature"),
            lambda: res.fm("focal", "temperature"),
        ),
        ClaimSpec(
            f"ca_c{c}",
            f"CA beats TS on ERM at FMNIST-C severity {c}",
            "Liu et al. 2024",
            lambda: res.fm("erm", "temperature", f"c{c}"),
            lambda: res.fm("erm", "ca", f"c{c}"),
        ),
        ClaimSpec(
            f"ts_shift_c{c}",
            f"ERM + TS: ECE at FMNIST-C severity {c} above clean (TS does not transfer to shift)",
            "Ovadia et al. 2019",
            lambda: res.fm("erm", "temperature", f"c{c}"),
            lambda: res.fm("erm", "temperature"),
        ),
    ]
    return specs


def judge(spec: ClaimSpec, min_effect: float) -> Claim:
    """The core claim rule on the per-seed differences worse - better (positive = claim)."""
    worse, better = spec.worse(), spec.better()
    return paired_claim([w - b for w, b in zip(worse, better, strict=True)], min_effect=min_effect)


def regime_check(res: Results, threshold: float) -> Claim:
    """Is uncalibrated ERM overconfident enough: clean-test ECE - ``threshold`` > 0 per seed."""
    return paired_claim([e - threshold for e in res.fm("erm", "none")], min_effect=0.0)


def _ms(values: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    return fmt_mean_std(mean_std(values), digits, scale)


def claims_table(specs: list[ClaimSpec], claims: dict[str, Claim], regime: Claim, cfg) -> str:
    rows = [
        [
            f"uncalibrated ERM is overconfident: clean ECE ≥ {100 * cfg['regime_ece']:g} %",
            "issue #16",
            regime.text("pts above the bar", 2),
        ]
    ]
    for s in specs:
        rows.append([s.text, s.source, claims[s.key].text("pts", 2)])
    return markdown_table(["claim (ECE, lower is better)", "paper", "verdict"], rows, "lll")


def _scaled(claim: Claim) -> Claim:
    """A claim in ECE points (x 100) for printing."""
    d = claim.as_dict()
    for k in ("mean", "se", "ci_low", "ci_high", "min_effect", "mde"):
        d[k] = 100 * d[k]
    return Claim(**d)


def overlap_table(res: Results, params: Mapping[str, Any]) -> str:
    labels = (
        ("erm", "ERM"),
        ("erm+ts", "ERM + TS"),
        ("mixup", "Mixup"),
        ("mixup+ts", "Mixup + TS"),
    )
    rows = []
    for mean in params["overlap"]["data"]["means"]:
        for method, label in labels:
            cells = [_ms(res.ov(mean, method, m), s) for m, s in (("accuracy", 100), ("nll", 1))]
            cells += [_ms(res.ov(mean, method, m)) for m in ("ece", "ace")]
            temps = res.ov(mean, method, "T") if method.endswith("+ts") else None
            cells.append(_ms(temps, 1) if temps else "")
            rows.append([f"{mean:g}", label, *cells])
    head = ["mean (overlap)", "method", "Acc %", "NLL", "ECE %", "ACE %", "T (TS)"]
    return markdown_table(head, rows, "ll" + "r" * 5)


def eval_sets(cfg: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(set key, label) of the clean test set and each FMNIST-C severity."""
    sev = [(f"c{s}", f"FMNIST-C severity {s}") for s in cfg["ood"]["severities"]]
    return [("test", "clean test"), *sev]


def fmnist_tables(res: Results, cfg: Mapping[str, Any]) -> str:
    columns = ["none", *cfg["calibrators"]]
    sets = eval_sets(cfg)
    fit_rows = []
    for loss in cfg["losses"]:
        fit = [res.fmnist[run_name(loss, s)]["fit"] for s in cfg["seeds"]]
        fit_rows.append(
            [
                loss,
                _ms([f["train_acc"] for f in fit]),
                _ms([f["train_nll"] for f in fit], 1, 4),
                *(_ms(res.fm(loss, "none", k, "accuracy")) for k, _ in sets),
            ]
        )
    head = ["loss", "train acc %", "train NLL", *(f"acc % {label}" for _, label in sets)]
    parts = [
        "Fit of the training labels and accuracy (uncalibrated; TS and CA keep the argmax)",
        markdown_table(head, fit_rows),
    ]
    for split, label in sets:
        for metric, title, scale in (
            ("ece", "ECE % (15 equal-width bins)", 100),
            ("nll", "NLL", 1),
        ):
            if metric == "nll" and split != "test":
                continue
            rows = [
                [loss, *(_ms(res.fm(loss, c, split, metric), scale) for c in columns)]
                for loss in cfg["losses"]
            ]
            parts += [f"{title}, {label}", markdown_table(["loss", *columns], rows)]
    rows = [
        [loss, *(_ms(res.fm(loss, c, "test", "adaptive_ece")) for c in columns)]
        for loss in cfg["losses"]
    ]
    parts += [
        "adaptive ECE % (15 equal-mass bins), clean test",
        markdown_table(["loss", *columns], rows),
    ]
    rows = [
        [loss, *(_ms(res.fm(loss, c, "test", "brier"), 1, 3) for c in columns)]
        for loss in cfg["losses"]
    ]
    parts += ["Brier, clean test", markdown_table(["loss", *columns], rows)]
    return "\n\n".join(parts)


def noise_table(res: Results, cfg: Mapping[str, Any]) -> str:
    rows = []
    for rate in cfg["label_noise"]["rates"]:
        for loss in cfg["label_noise"]["losses"]:
            for suffix, cal in (("", "none"), (" + TS", "temperature")):
                fit = [res.fmnist[run_name(loss, s, float(rate))]["fit"] for s in cfg["seeds"]]
                rows.append(
                    [
                        f"{rate:g}",
                        loss + suffix,
                        _ms([f["train_acc"] for f in fit]),
                        _ms(res.fm(loss, cal, metric="accuracy", noise=float(rate))),
                        _ms(res.fm(loss, cal, metric="nll", noise=float(rate)), 1),
                        _ms(res.fm(loss, cal, noise=float(rate))),
                        _ms(res.fm(loss, cal, metric="adaptive_ece", noise=float(rate))),
                    ]
                )
    head = ["noise", "method", "train acc % (noisy labels)", "test acc %", "NLL", "ECE %", "ACE %"]
    return markdown_table(head, rows, "ll" + "r" * 5)


def crosscheck_table(res: Results, params: Mapping[str, Any]) -> str:
    """Temperature scaling fitted by us and as in the authors' code, on the same logits:
    temperatures and ERM + TS's ECE per overlap mean and per noise rate."""
    rows, seeds = [], params["fmnist"]["seeds"]
    for mean in params["overlap"]["data"]["means"]:
        rows.append(
            [
                f"synthetic, mean {mean:g}",
                _ms(res.ov(mean, "erm+ts", "T"), 1),
                _ms(res.ov(mean, "erm+ts_authors", "T"), 1),
                _ms(res.ov(mean, "erm")),
                _ms(res.ov(mean, "erm+ts")),
                _ms(res.ov(mean, "erm+ts_authors")),
            ]
        )
    for rate in params["fmnist"]["label_noise"]["rates"]:
        r = float(rate)
        rows.append(
            [
                f"Fashion-MNIST, noise {rate:g}",
                _ms([res.fmnist[run_name("erm", s, r)]["T"]["temperature"] for s in seeds], 1),
                _ms([res.fmnist[run_name("erm", s, r)]["T"][AUTHORS_TS] for s in seeds], 1),
                _ms(res.fm("erm", "none", noise=r)),
                _ms(res.fm("erm", "temperature", noise=r)),
                _ms(res.fm("erm", AUTHORS_TS, noise=r)),
            ]
        )
    head = [
        "ERM",
        "T ours",
        "T authors' fit",
        "ECE % no TS",
        "ECE % + TS (ours)",
        "ECE % + TS (authors' fit)",
    ]
    return markdown_table(head, rows)


def crosscheck_summary(res: Results, params: Mapping[str, Any], claims: dict[str, Claim]) -> str:
    """What the temperature cross-check shows, computed: how far each fit moves T, how much of
    ERM's ECE each leaves, and the mixup verdicts under each fit."""
    means, rates = params["overlap"]["data"]["means"], params["fmnist"]["label_noise"]["rates"]
    seeds = params["fmnist"]["seeds"]
    ours_t, their_t, ours_left, their_left = [], [], [], []
    for mean in means:
        ours_t += res.ov(mean, "erm+ts", "T")
        their_t += res.ov(mean, "erm+ts_authors", "T")
        raw = mean_std(res.ov(mean, "erm")).mean
        ours_left.append(mean_std(res.ov(mean, "erm+ts")).mean / raw)
        their_left.append(mean_std(res.ov(mean, "erm+ts_authors")).mean / raw)
    for rate in rates:
        r = float(rate)
        ours_t += [res.fmnist[run_name("erm", s, r)]["T"]["temperature"] for s in seeds]
        their_t += [res.fmnist[run_name("erm", s, r)]["T"][AUTHORS_TS] for s in seeds]
        raw = mean_std(res.fm("erm", "none", noise=r)).mean
        ours_left.append(mean_std(res.fm("erm", "temperature", noise=r)).mean / raw)
        their_left.append(mean_std(res.fm("erm", AUTHORS_TS, noise=r)).mean / raw)
    high, top = min(means), max(rates)
    return (
        f"Over these rows the authors' fit moves T from 1 to between {min(their_t):.2f} and "
        f"{max(their_t):.2f}, where the NLL optimum (ours) lies between {min(ours_t):.2f} and "
        f"{max(ours_t):.2f}; ERM + TS keeps {min(their_left):.0%} to {max(their_left):.0%} of "
        f"ERM's ECE with their fit and {min(ours_left):.0%} to {max(ours_left):.0%} with ours. "
        f"Mixup + TS against ERM + TS, both with the same fit: at mean {high:g} "
        f"*{claims['overlap_mixup_ts'].verdict}* with ours, "
        f"*{claims['overlap_mixup_ts_authors'].verdict}* with theirs; at noise {top:g} "
        f"*{claims['noise_mixup_ts'].verdict}* with ours, "
        f"*{claims['noise_mixup_ts_authors'].verdict}* with theirs."
    )


def reliability_grid(params: Mapping[str, Any], readme: Path) -> str:
    """The first seed's reliability diagrams (clean test, the highest severity), linked
    relative to the README."""
    cfg = params["fmnist"]
    base = os.path.relpath(Path(params["paths"]["results"]) / "fmnist", readme.parent)
    c = f"c{max(cfg['ood']['severities'])}"
    heads = [(cal, k) for k in ("test", c) for cal in ("none", "temperature")]
    rows = [
        [loss]
        + [f'<img src="{base}/reliability/{loss}_{cal}_{k}.png" width="170">' for cal, k in heads]
        for loss in cfg["reliability"]
    ]
    return markdown_table(["loss", *(f"{cal}, {k}" for cal, k in heads)], rows, "l" * 5)


def series_csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[f"{v:.6g}" if isinstance(v, float) else v for v in r] for r in rows])
    return buf.getvalue()


def headline(res: Results, params: Mapping[str, Any]) -> dict[str, Any]:
    """Flat DVC metrics: ece.<loss>.<calibrator> (clean test), acc.<loss>, noise_ece.<method>
    .r<rate>, overlap_ece.<method>.m<mean>: means over seeds."""
    cfg = params["fmnist"]
    mean = lambda v: mean_std(v).mean  # noqa: E731
    out: dict[str, Any] = {
        "ece": {
            loss: {c: mean(res.fm(loss, c)) for c in ["none", *cfg["calibrators"]]}
            for loss in cfg["losses"]
        },
        "acc": {loss: mean(res.fm(loss, "none", metric="accuracy")) for loss in cfg["losses"]},
        "noise_ece": {},
        "overlap_ece": {},
    }
    for loss in cfg["label_noise"]["losses"]:
        for suffix, cal in (("", "none"), ("+ts", "temperature")):
            out["noise_ece"][loss + suffix] = {
                f"r{key(r)}": mean(res.fm(loss, cal, noise=float(r)))
                for r in cfg["label_noise"]["rates"]
            }
    for method in ("erm", "erm+ts", "mixup", "mixup+ts"):
        out["overlap_ece"][method] = {
            f"m{key(m)}": mean(res.ov(m, method)) for m in params["overlap"]["data"]["means"]
        }
    return out


def series(res: Results, params: Mapping[str, Any]) -> dict[str, str]:
    """The ECE-versus-overlap and ECE-versus-noise series (means over seeds) as CSV texts,
    keyed by their path under ``<results>``."""
    methods = ("erm", "erm+ts", "mixup", "mixup+ts")
    rows = [
        [m, *(mean_std(res.ov(m, meth)).mean for meth in methods)]
        for m in params["overlap"]["data"]["means"]
    ]
    cfg = params["fmnist"]
    cols = [(loss, cal) for loss in cfg["label_noise"]["losses"] for cal in ("none", "temperature")]
    noise_rows = [
        [float(r), *(mean_std(res.fm(loss, cal, noise=float(r))).mean for loss, cal in cols)]
        for r in cfg["label_noise"]["rates"]
    ]
    header = ["noise", *(loss + ("+ts" if cal != "none" else "") for loss, cal in cols)]
    return {
        "overlap/ece_by_mean.csv": series_csv(["mean", *methods], rows),
        "fmnist/ece_by_noise.csv": series_csv(header, noise_rows),
    }


def build(params: Mapping[str, Any], readme: Path) -> tuple[str, dict, dict, dict[str, str]]:
    """(README section, headline metrics, claims record, CSV series) from the results on disk."""
    results = Path(params["paths"]["results"])
    overlap = json.loads((results / "overlap" / "runs.json").read_text(encoding="utf-8"))
    fmnist = json.loads((results / "fmnist" / "runs.json").read_text(encoding="utf-8"))
    res = Results(overlap, fmnist, params["fmnist"])
    ccfg = params["claims"]
    specs = claim_specs(res, params)
    claims = {s.key: judge(s, ccfg["min_effect"]) for s in specs}
    regime = regime_check(res, ccfg["regime_ece"])
    shown = {k: _scaled(v) for k, v in claims.items()}
    ov, fm = params["overlap"], params["fmnist"]
    n_seeds = len(fm["seeds"])
    body = "\n\n".join(
        [
            "### Claims",
            f"Verdicts by the core claim rule: paired per-seed differences (worse minus better, "
            f"in ECE points; {n_seeds} seeds for Fashion-MNIST, {ov['runs']} draws for the "
            f"synthetic study), their standard error and 95 % CI, the stated minimum effect "
            f"({100 * ccfg['min_effect']:g} point) and the minimal detectable effect (MDE) at "
            f"80 % power. *inconclusive* means no effect larger than about the MDE could be seen.",
            claims_table(specs, shown, _scaled(regime), ccfg),
            "### Synthetic study (two overlapping Gaussians)",
            f"{ov['runs']} draws per row (mean ± std), n = {ov['data']['n']}, dim = "
            f"{ov['data']['dim']}, MLP hidden {ov['model']['hidden']}, "
            f"{ov['optim']['epochs']} epochs, {ov['n_bins']} bins; test split "
            f"{ov['data']['test_fraction']:.0%}.",
            overlap_table(res, params),
            "### Fashion-MNIST: training losses x post-hoc calibrators",
            f"{fm['model']['name']} {fm['model'].get('channels', '')} / "
            f"{fm['model'].get('hidden', '')}, {fm['train_size']} training images, "
            f"{fm['optim']['epochs']} epochs, Adam {fm['optim']['lr']:g}, {n_seeds} seeds "
            f"(mean ± std); calibrators fitted on {fm['cal_size']} held-out training images; "
            f"FMNIST-C: {fm['ood']['per_corruption']} test images per corruption x 19 "
            f"corruptions, pooled per severity.",
            fmnist_tables(res, fm),
            "### Cross-check: temperature scaling as the authors' code fits it",
            "The same logits, temperature fitted by core.calibration.TemperatureScaling (NLL "
            "minimised over log T) and as in Chidambaram & Ge's released code (one L-BFGS step "
            "call on T, lr 0.01, at most 20 iterations; projects/calibration/crosscheck.py).",
            crosscheck_table(res, params),
            crosscheck_summary(res, params, claims),
            "### Fashion-MNIST label-noise variant (ERM vs mixup, with and without TS)",
            "Symmetric label noise on training, calibration and test labels alike (the noisy "
            "distribution is the one with class overlap); noise 0 reuses the main runs.",
            noise_table(res, fm),
            f"### Reliability diagrams (seed {fm['seeds'][0]})",
            reliability_grid(params, readme),
        ]
    )
    record = {k: v.as_dict() for k, v in claims.items()} | {"regime": regime.as_dict()}
    return body, headline(res, params), record, series(res, params)


def main(argv: list[str] | None = None) -> None:
    parser = entry_parser(__doc__.splitlines()[0], DEFAULT_PARAMS)
    parser.add_argument("--readme", default=README, help="README whose results section to write")
    args, params, _ = parse_entry(parser, argv)
    readme = Path(args.readme)
    body, metrics, record, csvs = build(params, readme)
    results = Path(params["paths"]["results"])
    replace_marked_section(readme, "results", body)
    write_metrics(results / "metrics.json", metrics)
    atomic_write_json(results / "claims.json", record)
    for rel, text in csvs.items():
        atomic_write_text(results / rel, text)


if __name__ == "__main__":
    main()
