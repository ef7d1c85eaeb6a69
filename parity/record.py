"""Golden records: the reference side of a gate run stored on disk, and gated against later.

    write_record(settings, "rec/")                       # `sdparity record`: runs diffusers, stores its tensors
    source = Record.open("rec/")                         # checks format, files, sizes, sha256 of every file
    run_gate(source.settings_with(candidates=("scratch",)), record=source)   # `sdparity check --against rec/`

What a record holds: every tensor the gate compares a candidate with —
  direct-<dtype>-<network>-seed<s>.safetensors   the direct checks' reference outputs (parity.network_check),
                                                  keys "00", "01", ... in the check's order; at fp32 on
                                                  the first seed also every paired layer's output
                                                  (keys "L...", tensor "layer:<module name>"), which
                                                  the per-layer rows compare;
  trace-<dtype>-<scheduler>-<mode>.safetensors   the all-diffusers traced pipeline run (parity.swap_check
                                                  baseline): text_embeddings, image_latents, per-step
                                                  noise_pred and latents, the decoded image;
at every dtype of the settings and at fp32 (the truth of the low-precision rows), and manifest.json:
format version, versions (torch, diffusers, transformers, sd-parity, git sha), device name, threads,
the gate settings (dtypes, seeds, steps, schedulers, modes, ...), prompts, the config hash and the
weights hash of the references, and each file with its byte size and sha256 and its tensors.

The gate asks a `Record` (or nothing: live) for these tensors; the rows then say `record:<id>`.
The scheduler, tokenizer and training checks compare live libraries in their own loops and stay
`live` rows. The candidates are still built from the reference weights (a preset's seeded weights,
or --model), whose hash must equal the record's.
Writing is atomic (parity.outputs.writing_dir); recording twice on one machine gives identical
tensor files (safetensors of the same tensors; no timestamps inside).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

FORMAT = 1
MANIFEST = "manifest.json"
KIND = "sdparity-golden-record"
TRACE_PARTS = ("text_embeddings", "image_latents", "noise_pred", "latents")


class RecordError(ValueError):
    """A record that cannot be used: incomplete, tampered, newer, or of other weights (exit 2)."""


# --------------------------------------------------------------------------- hashes and provenance
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@torch.no_grad()
def weights_hash(refs) -> str:
    """sha256 over every reference network's tensors (name, dtype, shape, bytes): not its config
    dict, which carries the diffusers version (a record must survive a diffusers upgrade)."""
    h = hashlib.sha256()
    for name in sorted(refs.networks):
        for key, t in sorted(refs.networks[name].state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}.{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def config_hash(refs) -> str:
    """sha256 of the model config (scratch_sd.config) and the scheduler config."""
    doc = {"model": dataclasses.asdict(refs.cfg), "scheduler": refs.scheduler_config}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: str) -> dict:
    import diffusers
    import transformers
    from importlib import metadata

    try:
        ours = metadata.version("sd-parity")
    except metadata.PackageNotFoundError:
        ours = "unknown"
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "sd_parity": ours, "git_sha": git_sha(), "device": device, "device_name": name,
            "threads": torch.get_num_threads(), "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "python": platform.python_version(), "platform": platform.platform()}


# --------------------------------------------------------------------------- what a gate compares
def record_dtypes(settings) -> tuple[str, ...]:
    """The settings' dtypes and fp32 (the truth of the low-precision rows)."""
    from scratch_sd.names import DTYPES

    return tuple(d for d in DTYPES if d == "fp32" or d in settings.dtypes)


def needs_traces(settings) -> bool:
    from parity.swap_check import SWAPPABLE

    return bool(set(settings.components) & (set(SWAPPABLE) | {"pipeline"}))


def _direct_name(dtype: str, network: str, seed: int) -> str:
    return f"direct-{dtype}-{network}-seed{seed}.safetensors"


LAYER = "layer:"  # a per-layer entry of a direct file (network_check's per-layer rows)


def _key(i: int, tensor: str) -> str:
    """A direct file's key: "00", "01", ... for the outputs; "L000", ... for the layers after them."""
    return f"L{i:03d}" if tensor.startswith(LAYER) else f"{i:02d}"


def _trace_name(dtype: str, sched: str, mode: str) -> str:
    return f"trace-{dtype}-{sched}-{mode}.safetensors"


def _trace_tensors(trace) -> dict[str, torch.Tensor]:
    out = {}
    for part in TRACE_PARTS:
        for i, t in enumerate(getattr(trace, part)):
            out[f"{part}.{i:03d}"] = t
    if trace.image is not None:
        out["image"] = trace.image
    return out


def _as_trace(tensors: dict[str, torch.Tensor]):
    from parity.trace import Trace

    trace = Trace()
    for key in sorted(tensors):
        if key == "image":
            trace.image = tensors[key]
        else:
            getattr(trace, key.split(".")[0]).append(tensors[key])
    return trace


# --------------------------------------------------------------------------- writing
def write_record(settings, out, progress=None, force: bool = False, references=None) -> dict:
    """Run the reference side of the gate for `settings` and store it at `out` (atomically).
    Returns the manifest."""
    from safetensors.torch import save_file

    from parity import network_check
    from parity.gate import Recorder, cpu_cannot
    from parity.outputs import writing_dir
    from parity.references import quiet_libraries, references_for
    from parity.run_context import GateRun
    from parity.swap_check import baseline
    from parity.tolerances import Table
    from parity.trace import NEGATIVE, PROMPTS, STRENGTH
    from scratch_sd.names import NETWORKS

    say = progress or (lambda _m: None)
    t0 = time.time()
    quiet_libraries()
    refs = references or references_for(settings)
    run = GateRun(settings, refs, Recorder("record", settings.preset, settings.device, Table.load(None)), say)
    files: dict[str, dict] = {}
    skipped = []
    with writing_dir(out, force=force) as tmp:
        def save(name: str, tensors: dict, entries: list) -> None:
            tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
            save_file(tensors, str(tmp / name))
            files[name] = {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size,
                           "tensors": entries}

        for dtype in record_dtypes(settings):
            why = cpu_cannot(dtype, settings.device, refs.cfg.name)
            if why:
                skipped.append(f"{dtype}: {why}")
                continue
            nets = run.refs_at(dtype)
            with torch.no_grad():
                for name in NETWORKS:
                    if name not in settings.components:
                        continue
                    say(f"record {name} {dtype}: direct reference outputs, {settings.num_seeds} seeds")
                    for s in range(settings.seed, settings.seed + settings.num_seeds):
                        inp = network_check._inputs(name, refs.cfg, s, dtype, settings.device, refs.tokenizer)
                        outs, layers = network_check.reference_run(
                            name, nets[name], inp, s, refs.cfg, network_check.layers_wanted(dtype, s, settings.seed))
                        case = network_check.layer_case(name, s)
                        outs = outs + [(f"{LAYER}{n}", case, t) for n, t in layers.items()]
                        save(_direct_name(dtype, name, s), {_key(i, k): o for i, (k, _, o) in enumerate(outs)},
                             [{"key": _key(i, k), "tensor": k, "case": c, "shape": list(o.shape),
                               "dtype": str(o.dtype).replace("torch.", "")} for i, (k, c, o) in enumerate(outs)])
            if needs_traces(settings):
                for sched in settings.schedulers:
                    for mode in settings.modes:
                        trace = baseline(run, sched, mode, dtype)
                        tensors = _trace_tensors(trace)
                        save(_trace_name(dtype, sched, mode), tensors,
                             [{"key": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                              for k, v in sorted(tensors.items())])
            run.drop(dtype)
        from parity.shard import settings_dict

        st = settings_dict(settings)
        for k in ("candidates", "informational", "tolerances"):  # the candidate side's, not the record's
            st.pop(k, None)
        ident = hashlib.sha256(json.dumps({n: f["sha256"] for n, f in sorted(files.items())}).encode()).hexdigest()
        manifest = {"format": FORMAT, "kind": KIND, "id": ident[:12], "settings": st,
                    "reference": {"source": refs.source, "preset": refs.cfg.name, "config_hash": config_hash(refs),
                                  "weights_hash": weights_hash(refs)},
                    "environment": environment(settings.device),
                    "inputs": {"pipeline_prompts": list(PROMPTS), "negative_prompts": list(NEGATIVE),
                               "text_prompts": list(network_check.TEXT_PROMPTS), "strength": STRENGTH,
                               "guidance_scale": 7.5, "unet_timesteps": list(network_check.UNET_TIMESTEPS),
                               "seeds": list(range(settings.seed, settings.seed + settings.num_seeds))},
                    "recorded_dtypes": [d for d in record_dtypes(settings) if not any(s.startswith(d) for s in skipped)],
                    "skipped": skipped, "files": files, "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "elapsed_s": round(time.time() - t0, 3)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


# --------------------------------------------------------------------------- reading
class Record:
    """A verified record, the gate's reference source (see parity.gate.run_gate(record=...))."""

    def __init__(self, folder: Path, manifest: dict, profile: str = ""):
        self.folder, self.manifest, self.profile = folder, manifest, profile
        self._cache: dict[str, dict] = {}

    @property
    def id(self) -> str:
        return self.manifest["id"]

    @property
    def reference(self) -> str:
        return f"record:{self.id}"

    @classmethod
    def open(cls, folder, profile: str = "") -> "Record":
        folder = Path(folder)
        if not folder.is_dir():
            raise RecordError(f"--against {folder}: no such record folder")
        path = folder / MANIFEST
        if not path.is_file():
            raise RecordError(f"--against {folder}: incomplete record (no {MANIFEST})")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            manifest["format"], manifest["files"], manifest["settings"], manifest["reference"], manifest["id"]
        except (ValueError, KeyError, TypeError):
            raise RecordError(f"--against {folder}: {MANIFEST} is not a readable record manifest") from None
        if manifest.get("kind") != KIND:
            raise RecordError(f"--against {folder}: {MANIFEST} is not a golden record's (kind {manifest.get('kind')!r})")
        if not isinstance(manifest["format"], int) or manifest["format"] > FORMAT:
            raise RecordError(f"--against {folder}: record format {manifest['format']} is newer than this sd-parity "
                              f"reads (format {FORMAT}); upgrade sd-parity")
        for name, entry in sorted(manifest["files"].items()):
            f = folder / name
            if os.sep in name or name.startswith("."):
                raise RecordError(f"--against {folder}: {MANIFEST} names a file outside the record: {name!r}")
            if not f.is_file():
                raise RecordError(f"--against {folder}: incomplete record: {name} is missing")
            size = f.stat().st_size
            if size != entry["bytes"]:
                raise RecordError(f"--against {folder}: {name} is {size} bytes, the manifest says {entry['bytes']} "
                                  "(truncated or replaced)")
            digest = sha256_file(f)
            if digest != entry["sha256"]:
                raise RecordError(f"--against {folder}: {name} was changed after recording (sha256 {digest[:12]} "
                                  f"!= manifest {entry['sha256'][:12]})")
        return cls(folder, manifest, profile)

    def settings_with(self, **kw):
        """The gate settings of the record, with the candidate side's `kw` (candidates, device, ...)."""
        from parity.shard import settings_from

        return dataclasses.replace(settings_from(self.manifest["settings"]), **kw)

    def verify(self, refs) -> None:
        """The references the candidates are built from are the recorded ones (config, weights)."""
        want = self.manifest["reference"]
        for what, have in (("config", config_hash(refs)), ("weights", weights_hash(refs))):
            if have != want[f"{what}_hash"]:
                raise RecordError(f"record {self.id} was made from other {what} ({what} hash {want[what + '_hash'][:12]}, "
                                  f"these references {have[:12]}: {refs.source}); record again or pass the "
                                  "recorded model")

    def _load(self, name: str, device: str) -> dict:
        from safetensors.torch import load_file

        if name not in self.manifest["files"]:
            raise RecordError(f"record {self.id} has no {name}: the gate asks for a tensor it did not record")
        if name not in self._cache:
            self._cache[name] = load_file(str(self.folder / name))
        return {k: v.to(device) for k, v in self._cache[name].items()}

    def direct(self, network: str, dtype: str, seed: int, device: str) -> list:
        """(tensor kind, case, reference output) of one direct check, as network_check makes them."""
        name = _direct_name(dtype, network, seed)
        tensors = self._load(name, device)
        return [(e["tensor"], e["case"], tensors[e["key"]]) for e in self.manifest["files"][name]["tensors"]
                if not e["tensor"].startswith(LAYER)]

    def direct_layers(self, network: str, dtype: str, seed: int) -> dict:
        """The reference's per-layer outputs of one direct check (layer name -> tensor, on the CPU, in
        completion order), as network_check.reference_run records them; {} if the record has none."""
        name = _direct_name(dtype, network, seed)
        entries = [e for e in self.manifest["files"][name]["tensors"] if e["tensor"].startswith(LAYER)]
        tensors = self._load(name, "cpu") if entries else {}
        return {e["tensor"][len(LAYER):]: tensors[e["key"]] for e in entries}

    def trace(self, sched: str, mode: str, dtype: str, device: str):
        tensors = self._load(_trace_name(dtype, sched, mode), "cpu")  # the image stays on the CPU, as traced
        return _as_trace({k: v if k == "image" else v.to(device) for k, v in tensors.items()})

    def provenance(self) -> str:
        env, ref = self.manifest["environment"], self.manifest["reference"]
        return (f"reference: golden record {self.id} ({self.folder}), recorded {self.manifest.get('recorded_at', '?')} "
                f"on {env['device']} ({env['device_name']}), torch {env['torch']}, diffusers {env['diffusers']}, "
                f"transformers {env['transformers']}, sd-parity {env['sd_parity']} git {env['git_sha'][:10]}, "
                f"{env['threads']} threads, deterministic algorithms {env['deterministic_algorithms']}; "
                f"{ref['source']}, weights {ref['weights_hash'][:12]}, config {ref['config_hash'][:12]}"
                + (f"; judged by profile {self.profile}" if self.profile else ""))
