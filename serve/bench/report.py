"""`omni bench` output: the Markdown table (printed and written), results.json and, when matplotlib is importable,
results.png, from the BenchResults `omni.serve.bench.run.run_bench` returns."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from omni.serve.bench.goals import goals
from omni.serve.bench.results import BenchResults, EncoderResult, Level, Stats, Summary

__all__ = ["markdown", "write_report", "plot_png", "compare_markdown"]

_HIGHER, _LOWER = "higher is better", "lower is better"


def _ms(x: Optional[float]) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def _num(x: Optional[float], digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _mean(stats: Optional[Stats]) -> Optional[float]:
    return None if stats is None else stats.mean


def _pair(ours: Optional[float], official: Optional[float], ratio: Optional[float], fmt=_num) -> str:
    """'ours / official (ratio)' in one cell."""
    return f"{fmt(ours)} / {fmt(official)} ({_ratio(ratio)})"


def _latency_rows(levels: list[Level]) -> list[tuple]:
    """(metric, ours, official, ratio, better) at the lowest closed-loop concurrency level."""
    closed = [lv for lv in levels if not lv.request_rate]
    if not closed:
        return []
    c = min(lv.concurrency for lv in closed)
    by_mode = {lv.mode: lv for lv in closed if lv.concurrency == c}
    rows = []
    if "text" in by_mode:
        lv = by_mode["text"]
        rows.append(
            (
                f"TTFT, text only (ms), c={c}",
                _ms(_mean(lv.ours.ttft_s)),
                _ms(_mean(lv.official.ttft_s)),
                _ratio(lv.ratio.ttft),
                _LOWER,
            )
        )
    if "speech" in by_mode:  # /v1/audio/speech: the text is known, speech starts after the Talker's first codes
        o, f, r = by_mode["speech"].ours, by_mode["speech"].official, by_mode["speech"].ratio
        rows += [
            (
                f"TTFAP, speech endpoint (ms), c={c}",
                _ms(_mean(o.ttfap_s)),
                _ms(_mean(f.ttfap_s)),
                _ratio(r.ttfap),
                _LOWER,
            ),
            (f"real-time factor, speech endpoint, c={c}", _num(o.rtf), _num(f.rtf), _ratio(r.rtf), _LOWER),
        ]
    if "text+speech" in by_mode:
        lv = by_mode["text+speech"]
        o, f, r = lv.ours, lv.official, lv.ratio
        rows += [
            (f"TTFT, text+speech (ms), c={c}", _ms(_mean(o.ttft_s)), _ms(_mean(f.ttft_s)), _ratio(r.ttft), _LOWER),
            (
                f"TTFAP, first audio packet (ms), c={c}",
                _ms(_mean(o.ttfap_s)),
                _ms(_mean(f.ttfap_s)),
                _ratio(r.ttfap),
                _LOWER,
            ),
            (f"end to end, text+speech (ms), c={c}", _ms(_mean(o.e2e_s)), _ms(_mean(f.e2e_s)), _ratio(r.e2e), _LOWER),
            ("TTFAP / end to end", _num(_frac(o)), _num(_frac(f)), "", _LOWER),
            (f"real-time factor (compute s / speech s), c={c}", _num(o.rtf), _num(f.rtf), _ratio(r.rtf), _LOWER),
        ]
    return rows


def _frac(summary: Summary) -> Optional[float]:
    ttfap = _mean(summary.ttfap_s)
    return None if ttfap is None else ttfap / summary.e2e_s.mean


def _pcts(stats: Optional[Stats]) -> str:
    return "-" if stats is None else f"{_ms(stats.p50)} / {_ms(stats.p95)} / {_ms(stats.p99)}"


def _playback_rows(levels: list[Level]) -> list[str]:
    """Ours per level: latency percentiles, RTF, playback stalls."""
    rows = [
        "| output | load | TTFT p50/p95/p99 (ms) | TTFAP p50/p95/p99 (ms) | end to end p50/p95/p99 (ms) | RTF "
        "| stall per stream mean / max (s) | streams without a stall > 50 ms |",
        "|---|---|---|---|---|---:|---|---:|",
    ]
    for lv in levels:
        o = lv.ours
        stall = "-" if o.stall_s is None else f"{o.stall_s.mean:.2f} / {o.stall_s.max:.2f}"
        ok = "-" if o.continuity_ok is None else f"{o.continuity_ok:.0%}"
        rows.append(
            f"| {lv.mode} | {lv.label} | {_pcts(o.ttft_s)} | {_pcts(o.ttfap_s)} | {_pcts(o.e2e_s)} | "
            f"{_num(o.rtf)} | {stall} | {ok} |"
        )
    return rows


def _goal_rows(results: BenchResults) -> list[str]:
    rows = ["| goal | measured | bound | |", "|---|---:|---:|---|"]
    for g in goals(results):
        verdict = {True: "met", False: "**not met**", None: "not measured"}[g.met]
        detail = f" ({g.detail})" if g.detail else ""
        rows.append(f"| {g.name}{detail} | {_num(g.value)} | {'<=' if g.at_most else '>='} {g.bound:g} | {verdict} |")
    return rows


def _encoders(results: BenchResults) -> dict[str, EncoderResult]:
    return results.encoders.towers() if results.encoders is not None else {}


def markdown(results: BenchResults) -> str:
    s, levels = results.settings, results.levels
    cpu = results.device == "cpu"
    via = (
        f"the Serve app over streaming HTTP ({results.url}), read as a client reads it"
        if results.via == "http"
        else "the in-process pipeline (the same stages, no HTTP)"
    )
    lines = [
        f"# omni bench: `{results.model}` on {results.device} ({results.device_name}, "
        f"{results.cpu_count} cores, {results.torch_threads} torch threads)",
        "",
        f"Ours: {via}; requests run concurrently, continuously batched. Official: transformers "
        "`generate` on the same loaded checkpoint, one request at a time (no streaming: its first text and first "
        f"audio come with the whole reply). Greedy; at most {s['max_tokens']} text and {s['speech_tokens']} codec "
        f"tokens per reply; request i carries kind i mod {len(s['inputs'])} of: {', '.join(s['inputs'])}.",
    ]
    if cpu:
        lines += [
            "",
            "**CPU run: read the ratios (ours / official), not the absolute times; absolute figures mean "
            "something only on a GPU.**",
        ]
    lines += ["", "## Latency", "", "| metric | ours | official | ours / official | |", "|---|---:|---:|---:|---|"]
    lines += [f"| {m} | {a} | {b} | {r} | {better} |" for m, a, b, r, better in _latency_rows(levels)]
    lines += ["", "## Goals (issue #12)", ""] + _goal_rows(results)
    lines += [
        "",
        "## Under load",
        "",
        "c=N: N clients in a closed loop, each sending its next request when its last one ends; R/s: requests "
        "arriving as a Poisson process at R per second (open loop). Cells: ours / "
        "official (ratio). req/s, tok/s: higher is better; TTFT, TTFAP, RTF: lower is better. Official latencies "
        "include the wait for the requests served before them.",
        "",
        "| output | load | requests | req/s | text tok/s | TTFT mean (ms) | TTFAP mean (ms) | RTF | same ids "
        "(text, codec) |",
        "|---|---|---:|---|---|---|---|---|---|",
    ]
    for lv in levels:
        o, f, r, m = lv.ours, lv.official, lv.ratio, lv.match
        cells = [
            lv.mode,
            lv.label,
            str(lv.requests),
            _pair(o.req_per_s, f.req_per_s, r.req_per_s),
            _pair(o.text_tokens_per_s, f.text_tokens_per_s, r.text_tokens_per_s, lambda x: _num(x, 1)),
            _pair(_mean(o.ttft_s), _mean(f.ttft_s), r.ttft, _ms),
        ]
        if lv.mode != "text":
            cells += [
                _pair(_mean(o.ttfap_s), _mean(f.ttfap_s), r.ttfap, _ms),
                _pair(o.rtf, f.rtf, r.rtf),
                f"{m.text_ids:.0%}, {m.codec_ids:.0%}",
            ]
        else:
            cells += ["-", "-", f"{m.text_ids:.0%}, -"]
        lines.append("| " + " | ".join(cells) + " |")
    hidden = [lv for lv in levels if min(lv.ours.visible_text, lv.official.visible_text) < 1]
    if hidden:
        share = min(min(lv.ours.visible_text, lv.official.visible_text) for lv in hidden)
        lines += [
            "",
            f"Note: in {len(hidden)} of {len(levels)} levels some replies had no visible text (as few as "
            f"{share:.0%} had any): their ids decode to nothing, as a random checkpoint's ids beyond its "
            "tokenizer do. TTFT covers only the replies with text (\"-\": none had any).",
        ]
    lines += [
        "",
        "## Percentiles and playback (ours)",
        "",
        "Each stream played in real time from its first packet: a stall is a wait for audio with the buffer "
        "empty. The official path sends its speech in one piece (it never stalls; it starts late).",
        "",
    ]
    lines += _playback_rows(levels)
    lines += [
        "",
        "## Where the time goes (ours)",
        "",
        "Per generating stage over each level: model steps, requests per step, seconds in steps (and their "
        "share of the level's wall time; stages run in parallel, so shares can add up past 100%), and the mean "
        "wait from a request's input being ready at the stage to the step that serves it.",
        "",
        "| output | load | stage | steps | requests / step | busy s (share) | mean queue (ms) |",
        "|---|---|---|---:|---:|---|---:|",
    ]
    for lv in levels:
        for stage, st in lv.stages.items():
            busy = "-" if st["busy_share"] is None else f"{st['busy_share']:.0%}"
            lines.append(
                f"| {lv.mode} | {lv.label} | {stage} | {st['steps']} | {st['mean_batch']:.2f} | "
                f"{st['busy_s']:.1f} ({busy}) | {_num(st['mean_queue_ms'], 1)} |"
            )
    if results.via == "http":
        lines += ["", "Over HTTP the ids are not sent: \"same ids\" compares the text and the number of audio samples."]
    if results.encoders is not None:
        lines += [
            "",
            "## Encoders",
            "",
            "| encoder | items | items/s at batch 1 | items/s batched | batched / batch 1 |",
            "|---|---:|---:|---:|---:|",
        ]
        encoders = _encoders(results)
        for name, e in encoders.items():
            lines.append(
                f"| {name} | {e.items} | {e.batch1_items_per_s:.1f} | {e.batch_items_per_s:.1f} "
                f"(batch {e.batch_size}) | {_ratio(e.speedup)} |"
            )
        n_items = sum(e.items for e in encoders.values())
        lines += [
            "",
            f"Encoder inputs came from the model's processor in one call for the {n_items} items: "
            f"{results.encoders.processor_s:.2f} s, "
            "not counted above.",
        ]
    lines += [
        "",
        f"Whole run: {results.wall_s:.0f} s (torch {results.versions['torch']}, transformers "
        f"{results.versions['transformers']}).",
    ]
    return "\n".join(lines) + "\n"


def plot_png(results: BenchResults, path: Path) -> bool:
    """req/s, TTFT and TTFAP against concurrency (ours vs official) and the encoders' batch gain; False when
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    levels = [lv for lv in results.levels if not lv.request_rate]  # closed loop: against concurrency
    fig, axes = plt.subplots(1, 5, figsize=(22, 4))
    panels = [
        ("requests/s", lambda s: s.req_per_s),
        ("TTFT p50 (s)", lambda s: s.ttft_s and s.ttft_s.p50),
        ("TTFAP p95 (s), text+speech", lambda s: s.ttfap_s and s.ttfap_s.p95),
        ("streams without a stall > 50 ms", lambda s: s.continuity_ok),
    ]
    for ax, (title, get) in zip(axes, panels):
        for mode, style in (("text", "-"), ("text+speech", "--")):
            lvs = [lv for lv in levels if lv.mode == mode]
            for backend, marker in (("ours", "o"), ("official", "s")):
                ys = [get(getattr(lv, backend)) for lv in lvs]
                if any(y is not None for y in ys):
                    ax.plot([lv.concurrency for lv in lvs], ys, style, marker=marker, label=f"{backend}, {mode}")
        cs = sorted({lv.concurrency for lv in levels})
        ax.set(title=title, xlabel="concurrency", xscale="log")
        ax.set_xticks(cs, [str(c) for c in cs], minor=False)
        ax.minorticks_off()
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    enc = _encoders(results)
    names = list(enc)
    if names:
        axes[4].bar(
            [i - 0.2 for i in range(len(names))], [enc[n].batch1_items_per_s for n in names], 0.4, label="batch 1"
        )
        axes[4].bar(
            [i + 0.2 for i in range(len(names))], [enc[n].batch_items_per_s for n in names], 0.4, label="batched"
        )
        axes[4].set(title="encoder items/s", xticks=range(len(names)), xticklabels=names)
        axes[4].legend(fontsize=7)
    else:
        axes[4].axis("off")
    fig.suptitle(
        f"omni bench: {results.model} on {results.device}"
        + (" (CPU: compare ratios, not absolute times)" if results.device == "cpu" else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(results: BenchResults, out: Path, plot: bool = True) -> str:
    """results.json, results.md and (maybe) results.png under `out`; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results.to_json(), indent=2) + "\n")
    md = markdown(results)
    (out / "results.md").write_text(md)
    if plot and not plot_png(results, out / "results.png"):
        print("[bench] matplotlib is not installed: no results.png (pip install -e '.[bench]')", file=sys.stderr)
    return md


def compare_markdown(results: list[BenchResults]) -> str:
    """Several models' runs in one table: per model and level, ours / official and whether the ids agreed."""
    lines = [
        "# omni bench: models side by side",
        "",
        "Each row: one model at one load level, ours / official from that model's own run (the same requests "
        "through both paths). req/s: higher is better; TTFT, TTFAP, RTF: lower is better.",
        "",
        "| model | output | c | req/s | TTFT | TTFAP | RTF | same ids (text, codec) |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        for lv in r.levels:
            speech = lv.mode == "text+speech"
            lines.append(
                f"| `{r.model}` | {lv.mode} | {lv.concurrency} | {_ratio(lv.ratio.req_per_s)} | "
                f"{_ratio(lv.ratio.ttft)} | {_ratio(lv.ratio.ttfap) if speech else '-'} | "
                f"{_ratio(lv.ratio.rtf) if speech else '-'} | {lv.match.text_ids:.0%}, "
                f"{f'{lv.match.codec_ids:.0%}' if speech else '-'} |"
            )
    return "\n".join(lines) + "\n"
