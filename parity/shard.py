"""Sharding the gate: `sdparity check --shard i/N` runs a deterministic 1/N of the gate's work
units; `sdparity merge` joins the shards' run folders into one parity.csv / summary.md.

A work unit is (dtype, candidate, component): one component of the gate (text_encoder, vae, unet,
scheduler, pipeline, tokenizer, train) for one candidate at one precision. Unit k of the run's
list (dtypes in DTYPES order, then candidates, then components, as the settings give them; the
dtype-free tokenizer once, under the first dtype, as the gate records it) belongs to shard
k mod N + 1. A shard runs each of its units as a gate of its own (parity.gate.run_gate with that
one dtype, candidate and component) over references it builds itself: no state is shared between
shards, so any scheduler (a CI matrix, a batch queue) can run them. A unit at fp16/bf16 judges
against the fp32 reference outputs; the shard computes those itself (the gate does when fp32 is
not among its dtypes) and emits only the rows of the units it owns.

A unit's rows come out in the order the unsharded gate makes them; the unsharded gate interleaves
units (its swap matrix loops scheduler, mode, then component), so the merged parity.csv lists the
rows unit by unit: `canonical(rows, settings)` puts an unsharded run's rows in that same order.

Each shard's folder carries run.json (RUN_FILE): the full settings, the shard index and count,
the units it owned, its run id, reference source and notes. `merge` refuses shards of different
settings, a missing or duplicate shard, or a folder that is not a shard (ShardError: exit 2).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from parity.rows import COLUMNS, Row

RUN_FILE = "run.json"
RUN_FORMAT = 1
PIPELINE_LABELS = ("pipeline", "all_swapped")  # the rows of the `pipeline` unit


class ShardError(ValueError):
    """A bad --shard value or shards that do not merge (the CLI: exit 2, one line)."""


def parse_shard(text: str) -> tuple[int, int]:
    """'i/N' (1 <= i <= N) as (i, N)."""
    try:
        i, n = (int(p) for p in str(text).split("/"))
    except ValueError:
        raise ShardError(f"--shard must be i/N with integers 1 <= i <= N (got {text!r})") from None
    if n < 1 or not 1 <= i <= n:
        raise ShardError(f"--shard must be i/N with integers 1 <= i <= N (got {text!r})")
    return i, n


@dataclass(frozen=True)
class Unit:
    dtype: str
    candidate: str
    component: str


def units(settings) -> list[Unit]:
    """Every work unit of the gate, in a fixed order."""
    out = []
    for d in settings.dtypes:
        for c in settings.candidates:
            for comp in settings.components:
                if comp == "tokenizer" and d != settings.dtypes[0]:
                    continue  # integer ids: recorded once, under the first dtype
                out.append(Unit(d, c, comp))
    return out


def owned(settings, index: int, count: int) -> list[Unit]:
    return [u for k, u in enumerate(units(settings)) if k % count == index - 1]


def unit_of(row) -> Unit:
    """The unit a row belongs to (swap rows are labelled by what was swapped)."""
    get = row.get if isinstance(row, dict) else lambda k: getattr(row, k)
    comp = get("component")
    return Unit(get("dtype"), get("candidate"), "pipeline" if comp in PIPELINE_LABELS else comp)


def canonical(rows: list, settings) -> list:
    """Rows in unit order (stable within a unit): the order `merge` writes."""
    index = {u: k for k, u in enumerate(units(settings))}
    return sorted(rows, key=lambda r: index.get(unit_of(r), len(index)))


# --------------------------------------------------------------------------- settings <-> json
def settings_dict(settings) -> dict:
    d = {}
    for f in dataclasses.fields(settings):
        v = getattr(settings, f.name)
        d[f.name] = list(v) if isinstance(v, tuple) else (str(v) if isinstance(v, Path) else v)
    return d


def settings_from(d: dict):
    from parity.gate import GateSettings

    kw = {}
    for f in dataclasses.fields(GateSettings):
        if f.name not in d:
            continue
        v = d[f.name]
        if isinstance(v, list):
            v = tuple(v)
        elif f.name in ("model", "tolerances") and v is not None:
            v = Path(v)
        kw[f.name] = v
    return GateSettings(**kw)


# --------------------------------------------------------------------------- running a shard
def run_shard(settings, index: int, count: int, progress=None, references=None, record=None):
    """The gate's units owned by shard index/count, each run as its own gate over one set of
    references (built here unless given). Returns a GateResult of those rows."""
    from parity.gate import GateResult, run_gate
    from parity.references import references_for

    say = progress or (lambda _m: None)
    t0 = time.time()
    run_id = time.strftime("%Y%m%dT%H%M%S")
    mine = owned(settings, index, count)
    refs = references
    if refs is None and settings.needs_networks and any(u.component not in ("tokenizer", "train") for u in mine):
        say(f"shard {index}/{count}: building {settings.model or settings.preset} references")
        refs = references_for(settings)
    rows, images, notes = [], {}, []
    label, source = None, None
    for u in mine:
        say(f"shard {index}/{count}: {u.candidate} {u.component} {u.dtype}")
        sub = dataclasses.replace(settings, dtypes=(u.dtype,), candidates=(u.candidate,), components=(u.component,),
                                  informational=tuple(c for c in settings.informational if c == u.candidate))
        res = run_gate(sub, say, references=refs if u.component not in ("tokenizer", "train") else None,
                       record=record)
        for r in res.rows:
            r.run_id = run_id
        rows += res.rows
        images.update(res.images)
        notes += res.notes
        label, source = label or res.preset_label, source or res.source
    if label is None:  # a shard with no unit (N larger than the units)
        label = settings.preset if settings.model is None else f"model:{Path(settings.model).name}"
        source = refs.source if refs else f"preset:{settings.preset}"
    return GateResult(settings, rows, images, run_id, label, source, time.time() - t0, list(dict.fromkeys(notes)))


def run_json(result, index: int, count: int, reference: str = "live") -> bytes:
    """The shard's run.json: what `merge` checks and needs. `reference`: `live`, or the
    `record:<id>` the shard was checked against (shards of different references do not merge)."""
    mine = owned(result.settings, index, count)
    doc = {"format": RUN_FORMAT, "kind": "sdparity-check-shard", "settings": settings_dict(result.settings),
           "reference": reference,
           "shard": {"index": index, "count": count}, "units": [dataclasses.astuple(u) for u in mine],
           "run_id": result.run_id, "preset_label": result.preset_label, "source": result.source,
           "elapsed_s": result.elapsed_s, "notes": result.notes, "rows": len(result.rows)}
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


# --------------------------------------------------------------------------- merging
_BOOLS = {f.name for f in dataclasses.fields(Row) if f.type in ("bool", bool)}


def _value(column: str, text: str):
    if column in _BOOLS:
        return text == "True"
    if text == "" or column in ("run_id", "shape", "step", "case") or not text[:1] in "0123456789-+.ni":
        return text
    try:
        return int(text)
    except ValueError:
        pass
    try:
        v = float(text)
    except ValueError:
        return text
    return v if math.isfinite(v) or text.lower() in ("nan", "inf", "-inf") else text


def read_rows(csv_path: Path) -> list[Row]:
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ShardError(f"{csv_path}: parity.csv lacks the column {missing[0]!r}")
        out = []
        for d in reader:
            row = Row.from_dict({c: _value(c, d[c]) for c in COLUMNS})
            if row.step != "":
                row.step = int(row.step)
            out.append(row)
    return out


def _load(folder: Path) -> dict:
    path = Path(folder) / RUN_FILE
    if not Path(folder).is_dir():
        raise ShardError(f"{folder}: not a run folder")
    if not path.is_file() or not (Path(folder) / "parity.csv").is_file():
        raise ShardError(f"{folder}: not a shard's run folder (no {RUN_FILE} and parity.csv; run "
                         "`sdparity check --shard i/N --out ...`)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        doc["settings"], doc["shard"]["index"], doc["shard"]["count"]
    except (ValueError, KeyError, TypeError):
        raise ShardError(f"{path}: not a readable shard run.json") from None
    if doc.get("format", 0) > RUN_FORMAT:
        raise ShardError(f"{path}: format {doc.get('format')} is newer than this sd-parity reads ({RUN_FORMAT})")
    doc["folder"] = Path(folder)
    return doc


def merge(folders: list[Path]):
    """The shards' rows as one GateResult (rows in unit order), after checking they are one run's
    shards: the same settings, and each index 1..N exactly once."""
    from parity.gate import GateResult

    if not folders:
        raise ShardError("merge: no run folders given")
    docs = [_load(Path(f)) for f in folders]
    first = docs[0]
    for d in docs[1:]:
        if d["settings"] != first["settings"]:
            diff = next(k for k in sorted(set(d["settings"]) | set(first["settings"]))
                        if d["settings"].get(k) != first["settings"].get(k))
            raise ShardError(f"{d['folder']} was run with different settings than {first['folder']} "
                             f"({diff}: {d['settings'].get(diff)!r} vs {first['settings'].get(diff)!r})")
    for d in docs[1:]:
        if d.get("reference", "live") != first.get("reference", "live"):
            raise ShardError(f"{d['folder']} was checked against {d.get('reference', 'live')}, {first['folder']} "
                             f"against {first.get('reference', 'live')}: shards of one run share their reference")
    counts = {d["shard"]["count"] for d in docs}
    if len(counts) > 1:
        raise ShardError(f"shards of different counts: {', '.join(f'/{c}' for c in sorted(counts))}")
    count = counts.pop()
    seen: dict[int, Path] = {}
    for d in docs:
        i = d["shard"]["index"]
        if i in seen:
            raise ShardError(f"shard {i}/{count} given twice: {seen[i]} and {d['folder']}")
        seen[i] = d["folder"]
    missing = [i for i in range(1, count + 1) if i not in seen]
    if missing:
        raise ShardError(f"shard {missing[0]}/{count} is missing ({len(missing)} of {count} not given)")
    settings = settings_from(first["settings"])
    rows = []
    for d in sorted(docs, key=lambda d: d["shard"]["index"]):
        got = read_rows(d["folder"] / "parity.csv")
        if len(got) != d.get("rows", len(got)):
            raise ShardError(f"{d['folder']}: parity.csv has {len(got)} rows, run.json says {d['rows']}")
        rows += got
    rows = canonical(rows, settings)
    notes = list(dict.fromkeys(n for d in docs for n in d.get("notes", [])))
    notes.append(f"merged from {count} shards: " + ", ".join(f"{d['shard']['index']}/{count} run {d['run_id']}"
                                                            for d in sorted(docs, key=lambda d: d["shard"]["index"])))
    elapsed = sum(float(d.get("elapsed_s", 0.0)) for d in docs)
    return GateResult(settings, rows, {}, time.strftime("%Y%m%dT%H%M%S"), first["preset_label"], first["source"],
                      elapsed, notes)
