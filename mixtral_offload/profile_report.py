"""Profiles of a run: per forward pass and per layer figures from a Profiler, as JSON or a Chrome trace.

`build_profile` turns a Profiler's raw spans and counters into the documented JSON document
(schema in docs/profiling.md, `version` field); `chrome_trace` writes the same events in the Trace
Event Format; `read_profile` loads either back; `summary_tables` and `plot_profile` report on one.
"""
from __future__ import annotations

import bisect
import datetime
import json
import os
import time
from collections import defaultdict
from pathlib import Path

from .errors import MixtralOffloadError
from .profiling import Profiler
from .validate import PROFILE_LIMIT, float_field, int_field, parse_json, read_regular, str_field

FORMAT = "mixtral-offload-profile"
VERSION = 1
HIT_COUNTERS = ("cache_hit", "cache_miss", "prefetch_hit", "prefetch_waste")
TOP_SPANS = ("attention", "router", "experts", "lm_head", "sampling", "output")  # disjoint, on the main thread
PID = 1


def peak_memory() -> dict:
    """Peak resident memory of this process (bytes) and peak CUDA memory allocated (None without CUDA)."""
    rss = 0
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    except (ImportError, AttributeError):
        pass
    try:
        import psutil

        info = psutil.Process().memory_info()
        rss = max(rss, getattr(info, "peak_wset", 0), info.rss)
    except ImportError:
        pass
    vram = None
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            vram = int(torch.cuda.max_memory_allocated())
    except ImportError:
        pass
    return {"peak_rss_bytes": int(rss), "peak_vram_bytes": vram}


def build_profile(profiler: Profiler, end: float | None = None, **meta) -> dict:
    """The JSON profile of everything a Profiler recorded; end is a perf_counter() time (default: now).

    A forward pass ("token") runs from its `Profiler.token` mark to the end of the last span that
    starts before the next mark (usually the sampling of the token it produced). So idle time in a
    chat (the user typing) counts in no token, while in a generation the token durations add up to
    the wall time apart from the streaming between tokens.
    """
    end_s = (time.perf_counter() if end is None else end) - profiler.origin
    with profiler._lock:
        events = list(profiler.events)
        counters = list(profiler.counters)
        forwards = list(profiler.forwards)
    starts = [start for _, start in forwards]
    tokens = [{"index": index, "kind": kind, "start": start, "seconds": 0.0, "spans": defaultdict(float),
               "bytes": defaultdict(int), "counters": defaultdict(float)}
              for index, (kind, start) in enumerate(forwards)]
    event_rows = []
    for event in events:
        token = bisect.bisect_right(starts, event.start) - 1
        if token >= 0:
            tokens[token]["seconds"] = max(tokens[token]["seconds"], event.start + event.duration - starts[token])
        event_rows.append({"name": event.name, "start": event.start, "duration": event.duration,
                           "thread": event.thread, "token": token, "args": event.args})
        if token >= 0:
            tokens[token]["spans"][event.name] += event.duration
            if "bytes" in event.args:
                tokens[token]["bytes"][event.name] += int(event.args["bytes"])
    counter_rows = []
    for token, name, value, args in counters:
        counter_rows.append({"name": name, "value": value, "token": token, "args": args})
        if 0 <= token < len(tokens):
            tokens[token]["counters"][name] += value
    for token in tokens:
        token["spans"], token["bytes"], token["counters"] = (dict(token["spans"]), dict(token["bytes"]),
                                                            dict(token["counters"]))
    return {
        "format": FORMAT,
        "version": VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **meta,
        "wall_seconds": end_s - (starts[0] if starts else 0.0),
        "busy_seconds": sum(token["seconds"] for token in tokens),
        **peak_memory(),
        "tokens": tokens,
        "layers": layer_table(counter_rows),
        "spans": span_table(event_rows),
        "events": event_rows,
        "counters": counter_rows,
    }


def layer_table(counter_rows: list[dict]) -> list[dict]:
    """Per layer: cache hits, misses, prefetch hits and waste, hit rate (None without lookups)."""
    layers: dict[int, dict] = {}
    for row in counter_rows:
        layer = row["args"].get("layer")
        if row["name"] in HIT_COUNTERS and layer is not None:
            entry = layers.setdefault(int(layer), {"layer": int(layer), **{name: 0 for name in HIT_COUNTERS}})
            entry[row["name"]] += row["value"]
    for entry in layers.values():
        lookups = entry["cache_hit"] + entry["cache_miss"]
        entry["hit_rate"] = entry["cache_hit"] / lookups if lookups else None
    return [layers[layer] for layer in sorted(layers)]


def span_table(event_rows: list[dict]) -> dict:
    """Per span name: how many, total seconds, total bytes (spans may nest: 'copy' inside 'experts')."""
    table: dict[str, dict] = {}
    for row in event_rows:
        entry = table.setdefault(row["name"], {"count": 0, "seconds": 0.0, "bytes": 0})
        entry["count"] += 1
        entry["seconds"] += row["duration"]
        entry["bytes"] += int(row["args"].get("bytes", 0))
    return table


# -- Chrome trace (Trace Event Format) ---------------------------------------------------------------

def chrome_trace(profile: dict) -> dict:
    """The profile as a Trace Event Format document: spans as complete ('X') events, forward passes
    as 'X' events on their own track, counters as instant ('i') events, peak memory as a counter ('C')."""
    us = 1e6
    threads = {}  # Python thread ids are huge; number them 1, 2, ... in order of appearance

    def tid(thread):
        return threads.setdefault(thread, len(threads) + 1)

    main = tid(profile["events"][0]["thread"]) if profile["events"] else 1
    trace = [{"name": "process_name", "ph": "M", "ts": 0, "pid": PID, "tid": main,
              "args": {"name": f"mixtral-offload {profile.get('command', '')}".strip()}}]
    for token in profile["tokens"]:
        trace.append({"name": f"forward {token['kind']}", "cat": "forward", "ph": "X", "ts": token["start"] * us,
                      "dur": token["seconds"] * us, "pid": PID, "tid": 0,
                      "args": {"index": token["index"], "kind": token["kind"]}})
    for event in profile["events"]:
        trace.append({"name": event["name"], "cat": "span", "ph": "X", "ts": event["start"] * us,
                      "dur": event["duration"] * us, "pid": PID, "tid": tid(event["thread"]),
                      "args": dict(event["args"])})
    starts = [token["start"] for token in profile["tokens"]]
    for counter in profile["counters"]:
        token = counter["token"]
        ts = starts[token] * us if 0 <= token < len(starts) else 0.0
        trace.append({"name": counter["name"], "cat": "counter", "ph": "i", "s": "t", "ts": ts, "pid": PID,
                      "tid": main, "args": {"value": counter["value"], "token": token, **counter["args"]}})
    end = (starts[0] + profile["wall_seconds"]) * us if starts else 0.0
    memory = {"rss_bytes": profile["peak_rss_bytes"], "vram_bytes": profile["peak_vram_bytes"] or 0}
    trace.append({"name": "peak memory", "ph": "C", "ts": end, "pid": PID, "tid": main, "args": memory})
    trace.append({"name": "thread_name", "ph": "M", "ts": 0, "pid": PID, "tid": 0,
                  "args": {"name": "forward passes"}})
    tables = ("tokens", "events", "counters", "layers", "spans")
    meta = {key: str(value) for key, value in profile.items() if key not in tables}
    return {"traceEvents": trace, "displayTimeUnit": "ms", "otherData": meta}


def profile_from_chrome(trace: dict) -> dict:
    """Rebuild a profile (tokens, events, counters and the tables) from a trace written by chrome_trace."""
    us = 1e6
    meta = trace.get("otherData", {})
    forwards = sorted((e for e in trace["traceEvents"] if e.get("cat") == "forward"), key=lambda e: e["ts"])
    starts = [e["ts"] / us for e in forwards]
    tokens = [{"index": i, "kind": e["args"]["kind"], "start": e["ts"] / us, "seconds": e["dur"] / us,
               "spans": defaultdict(float), "bytes": defaultdict(int), "counters": defaultdict(float)}
              for i, e in enumerate(forwards)]
    events, counters, memory = [], [], {}
    for e in trace["traceEvents"]:
        if e.get("cat") == "span":
            token = bisect.bisect_right(starts, e["ts"] / us) - 1
            events.append({"name": e["name"], "start": e["ts"] / us, "duration": e["dur"] / us, "thread": e["tid"],
                           "token": token, "args": e.get("args", {})})
            if token >= 0:
                tokens[token]["spans"][e["name"]] += e["dur"] / us
                if "bytes" in e.get("args", {}):
                    tokens[token]["bytes"][e["name"]] += int(e["args"]["bytes"])
        elif e.get("cat") == "counter":
            args = dict(e.get("args", {}))
            value, token = args.pop("value"), args.pop("token")
            counters.append({"name": e["name"], "value": value, "token": token, "args": args})
            if 0 <= token < len(tokens):
                tokens[token]["counters"][e["name"]] += value
        elif e.get("ph") == "C" and e.get("name") == "peak memory":
            memory = e["args"]
    for token in tokens:
        token["spans"], token["bytes"], token["counters"] = (dict(token["spans"]), dict(token["bytes"]),
                                                            dict(token["counters"]))
    wall = float(meta.get("wall_seconds", 0.0)) or sum(t["seconds"] for t in tokens)
    return {"format": FORMAT, "version": VERSION, "command": meta.get("command"), "model": meta.get("model"),
            "wall_seconds": wall, "busy_seconds": sum(t["seconds"] for t in tokens),
            "peak_rss_bytes": memory.get("rss_bytes", 0),
            "peak_vram_bytes": memory.get("vram_bytes") or None, "tokens": tokens,
            "layers": layer_table(counters), "spans": span_table(events), "events": events, "counters": counters}


def write_profile(profile: dict, path: str | Path, fmt: str = "json") -> None:
    """Write a profile as 'json' (the documented schema) or 'chrome' (Trace Event Format)."""
    document = chrome_trace(profile) if fmt == "chrome" else profile
    try:
        Path(path).write_text(json.dumps(document, indent=None, separators=(",", ":")) + "\n", encoding="utf-8")
    except OSError as exc:
        raise MixtralOffloadError(f"{path}: cannot write the profile ({exc.strerror or exc})") from None


def read_profile(path: str | Path) -> dict:
    """Load a profile written by write_profile, in either format, every field a report reads checked."""
    document = parse_json(read_regular(path, PROFILE_LIMIT, "profile"), str(path))
    if isinstance(document, dict) and "traceEvents" in document:
        try:
            document = profile_from_chrome(document)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise MixtralOffloadError(f"{path}: not a readable Chrome trace ({type(exc).__name__}: {exc})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise MixtralOffloadError(f"{path}: not a mixtral-offload profile")
    if int_field(document.get("version", 0), "version", 0, 2**31, str(path)) > VERSION:
        raise MixtralOffloadError(f"{path}: profile version {document['version']} is newer than this "
                                  f"mixtral-offload reads ({VERSION})")
    check_profile(document, str(path))
    return document


def check_profile(profile: dict, source: str) -> None:
    """The types and ranges of every field summary_tables and plot_profile read."""
    def number(value, name):
        return float_field(value, name, 0, source=source)

    def table(value, name, kind):
        if not isinstance(value, kind):
            raise MixtralOffloadError(f"{source}: {name} must be a {'list' if kind is list else 'mapping'}")
        return value

    for name in ("wall_seconds", "busy_seconds"):
        number(profile.get(name), name)
    for name in ("peak_rss_bytes", "peak_vram_bytes"):
        if profile.get(name) is not None:
            number(profile[name], name)
    for token in table(profile.get("tokens"), "tokens", list):
        table(token, "a token", dict)
        int_field(token.get("index"), "a token's index", 0, 2**63, source)
        str_field(token.get("kind"), "a token's kind", source)
        number(token.get("seconds"), "a token's seconds")
        for value in table(token.get("bytes"), "a token's bytes", dict).values():
            number(value, "a token's bytes")
    for name, entry in table(profile.get("spans"), "spans", dict).items():
        table(entry, f"span {name}", dict)
        for field in ("count", "seconds", "bytes"):
            number(entry.get(field), f"span {name} {field}")
    for row in table(profile.get("counters"), "counters", list):
        table(row, "a counter", dict)
        str_field(row.get("name"), "a counter's name", source)
        number(row.get("value"), f"counter {row['name']}")
    for entry in table(profile.get("layers"), "layers", list):
        table(entry, "a layer", dict)
        int_field(entry.get("layer"), "a layer's index", 0, 2**31, source)
        for field in HIT_COUNTERS:
            number(entry.get(field), f"layer {entry['layer']} {field}")
        if entry.get("hit_rate") is not None:
            float_field(entry["hit_rate"], "hit_rate", 0, 1, source=source)


# -- text and plot reports ------------------------------------------------------------------------

def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).rjust(width) if i else str(cell).ljust(width)
                       for i, (cell, width) in enumerate(zip(line, widths))) for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024


def summary_tables(profile: dict) -> str:
    """The text report: overview, time by span name, per-layer hit rates."""
    tokens = profile["tokens"]
    decode = [t for t in tokens if t["kind"] == "decode"]
    prefill = [t for t in tokens if t["kind"] != "decode"]
    decode_seconds = sum(t["seconds"] for t in decode)
    total_bytes = sum(sum(t["bytes"].values()) for t in tokens)
    low_bit_bytes = sum(t["bytes"].get("lowbit_read", 0) for t in tokens)  # misses read from the low-bit copy
    ahead, unused = (sum(row["value"] for row in profile["counters"] if row["name"] == name)
                     for name in ("lowbit_prefetch", "lowbit_prefetch_waste"))  # guesses read from it
    vram = profile.get("peak_vram_bytes")
    overview = [
        ["command", str(profile.get("command") or "-")],
        ["wall time", f"{profile['wall_seconds']:.3f} s"],
        ["in forward passes", f"{profile['busy_seconds']:.3f} s"],
        ["forward passes", f"{len(tokens)} ({len(prefill)} prefill, {len(decode)} decode)"],
        ["prefill time", f"{sum(t['seconds'] for t in prefill):.3f} s"],
        ["decode speed", f"{len(decode) / decode_seconds:.2f} tok/s" if decode_seconds > 0 else "-"],
        ["bytes read per token", _bytes(total_bytes / len(tokens)) if tokens else "-"],
        ["of which low-bit copy", _bytes(low_bit_bytes / len(tokens)) if low_bit_bytes else "-"],
        ["low-bit copies read ahead", f"{ahead:g} ({unused:g} unused)" if ahead else "-"],
        ["peak RSS", _bytes(profile.get("peak_rss_bytes") or 0)],
        ["peak VRAM", _bytes(vram) if vram else "-"],
    ]
    parts = [_table(["run", ""], overview)]
    busy = profile["busy_seconds"] or 1.0
    spans = sorted(profile["spans"].items(), key=lambda item: -item[1]["seconds"])
    rows = [[name, str(entry["count"]), f"{entry['seconds']:.4f}", f"{100 * entry['seconds'] / busy:.1f}%",
             f"{1e3 * entry['seconds'] / max(len(tokens), 1):.3f}", _bytes(entry["bytes"]) if entry["bytes"] else "-"]
            for name, entry in spans]
    top = sum(profile["spans"].get(name, {}).get("seconds", 0.0) for name in TOP_SPANS)
    other = max(busy - top, 0.0)
    rows.append(["(other)", "", f"{other:.4f}", f"{100 * other / busy:.1f}%", "", ""])
    parts.append(_table(["span", "count", "seconds", "of busy", "ms/token", "bytes"], rows)
                 + "\n(busy: time in forward passes; spans nest: expert_*, copy and pool_read are inside "
                   "experts; (other) is busy minus "
                   + "/".join(TOP_SPANS) + ")")
    if profile["layers"]:
        rows = [[str(entry["layer"]), f"{entry['cache_hit']:g}", f"{entry['cache_miss']:g}",
                 "-" if entry["hit_rate"] is None else f"{entry['hit_rate']:.1%}",
                 f"{entry['prefetch_hit']:g}", f"{entry['prefetch_waste']:g}"] for entry in profile["layers"]]
        parts.append(_table(["layer", "hits", "misses", "hit rate", "prefetch hits", "prefetch waste"], rows))
    else:
        parts.append("no expert cache counters recorded (all experts resident)")
    return "\n\n".join(parts)


def plot_profile(profile: dict, path: str | Path) -> None:
    """A PNG with per-token latency and, when counters exist, the per-layer hit rate."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise MixtralOffloadError("--plot needs matplotlib: pip install \"mixtral-offload[plot]\"") from None
    layers = [entry for entry in profile["layers"] if entry["hit_rate"] is not None]
    figure, axes = plt.subplots(2 if layers else 1, 1, figsize=(9, 7 if layers else 4), squeeze=False)
    ax = axes[0][0]
    for kind, colour in (("prefill", "tab:orange"), ("decode", "tab:blue")):
        points = [(t["index"], 1e3 * t["seconds"]) for t in profile["tokens"] if t["kind"] == kind]
        if points:
            ax.plot(*zip(*points), ".-" if kind == "decode" else "o", color=colour, label=kind, markersize=3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("forward pass")
    ax.set_ylabel("latency (ms)")
    ax.set_title("per-token latency")
    ax.legend()
    if layers:
        ax = axes[1][0]
        ax.bar([entry["layer"] for entry in layers], [100 * entry["hit_rate"] for entry in layers])
        ax.set_xlabel("layer")
        ax.set_ylabel("hit rate (%)")
        ax.set_ylim(0, 100)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title("expert cache hit rate per layer")
    figure.tight_layout()
    figure.savefig(os.fspath(path), dpi=100)
    plt.close(figure)
